"""Convert a saved transformers ``CLIPModel`` (and its processor) into an `MSClipModel` with nothing shared.

    python -m modeling_msclip.convert_clip --input CLIP_DIR --output DIR [--vocab TOKENIZER]

The result computes the same embeddings and logits as the CLIP model for any vocabulary and end-token id: it pools
text where transformers' CLIP does, at the first ``eos_token_id`` (``text_config.pooling="eos"``), or at
``argmax(input_ids)`` for the legacy configs with ``eos_token_id=2``, as transformers does for them. It is a starting
point for MS-CLIP-style fine-tuning or for comparing architectures on equal terms. The processor of ``CLIP_DIR``
is saved alongside; a folder without one gets an MS-CLIP processor built from ``--vocab`` (CLIP image statistics),
or a warning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPConfig, CLIPModel

from .configuration_msclip import MSClipConfig
from .convert_original_msclip import save_with_processor
from .modeling_msclip import MSClipModel

_LAYER_PARTS = {
    "layer_norm1.weight": "layer_norm1.{m}.weight",
    "layer_norm1.bias": "layer_norm1.{m}.bias",
    "self_attn.out_proj.weight": "self_attn.{m}.out_proj.weight",
    "self_attn.out_proj.bias": "self_attn.{m}.out_proj.bias",
    "layer_norm2.weight": "layer_norm2.{m}.weight",
    "layer_norm2.bias": "layer_norm2.{m}.bias",
    "mlp.fc1.weight": "mlp.{m}.fc1.weight",
    "mlp.fc1.bias": "mlp.{m}.fc1.bias",
    "mlp.fc2.weight": "mlp.{m}.fc2.weight",
    "mlp.fc2.bias": "mlp.{m}.fc2.bias",
}


# Config fields that mean the same in transformers' CLIP and here, per tower (both conversion directions use them).
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)


# `MSClipModel` key -> transformers `CLIPModel` key, for the tensors outside the blocks (both directions use it).
TOP_LEVEL_KEYS = {
    "text_model.embeddings.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding": "text_model.embeddings.position_embedding.weight",
    "vision_model.embeddings.class_embedding": "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding": "vision_model.embeddings.position_embedding.weight",
    "vision_model.embeddings.pre_layernorm.weight": "vision_model.pre_layrnorm.weight",
    "vision_model.embeddings.pre_layernorm.bias": "vision_model.pre_layrnorm.bias",
    "projection_head.final_layer_norm.text.weight": "text_model.final_layer_norm.weight",
    "projection_head.final_layer_norm.text.bias": "text_model.final_layer_norm.bias",
    "projection_head.final_layer_norm.vision.weight": "vision_model.post_layernorm.weight",
    "projection_head.final_layer_norm.vision.bias": "vision_model.post_layernorm.bias",
    "projection_head.projection.text.weight": "text_projection.weight",
    "projection_head.projection.vision.weight": "visual_projection.weight",
    "logit_scale": "logit_scale",  # [1] here (DeepSpeed cannot partition 0-d), 0-d in CLIPModel
}


def config_from_clip(clip_config: CLIPConfig) -> MSClipConfig:
    """An `MSClipConfig` with the sizes of ``clip_config`` and no sharing."""
    text, vision = clip_config.text_config, clip_config.vision_config
    # transformers' CLIP keeps argmax pooling for configs saved before eos_token_id was set (they carry id 2).
    pooling = "argmax" if text.eos_token_id == 2 else "eos"
    return MSClipConfig(
        text_config={**{name: getattr(text, name) for name in TEXT_FIELDS}, "pooling": pooling},
        vision_config={name: getattr(vision, name) for name in VISION_FIELDS},
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=clip_config.logit_scale_init_value,
    )


def convert_clip_state_dict(clip_state: dict[str, torch.Tensor], config: MSClipConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a transformers CLIP state dict into `MSClipModel` keys."""
    state = {ours: clip_state[theirs] for ours, theirs in TOP_LEVEL_KEYS.items()}
    state["logit_scale"] = state["logit_scale"].reshape(1)
    for modality, tower in (("text", config.text_config), ("vision", config.vision_config)):
        for layer in range(tower.num_hidden_layers):
            source = f"{modality}_model.encoder.layers.{layer}."
            target = f"encoder.layers.{layer}."
            for clip_suffix, ours in _LAYER_PARTS.items():
                state[target + ours.format(m=modality)] = clip_state[source + clip_suffix]
            for part in ("weight", "bias"):
                state[f"{target}self_attn.{modality}.qkv_proj.{part}"] = torch.cat(
                    [clip_state[f"{source}self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")]
                )
    return {key: value.contiguous().clone() for key, value in state.items()}


def convert(
    input_dir: str | Path,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    vocab_path: str | Path | None = None,
) -> MSClipModel:
    """Load ``input_dir`` as a transformers CLIPModel and return (and optionally save) the equivalent MSClipModel.

    Raises:
        FileNotFoundError: when ``input_dir`` is not a directory (it is never looked up on the Hub).
    """
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"--input {input_dir} is not a directory (a saved transformers CLIPModel folder)")
    clip = CLIPModel.from_pretrained(input_dir)
    config = config_from_clip(clip.config)
    model = MSClipModel(config)
    model.load_state_dict(convert_clip_state_dict(clip.state_dict(), config), strict=True)
    model.eval()
    if output_dir is not None:
        try:
            processor = AutoProcessor.from_pretrained(input_dir)
        except (OSError, ValueError, TypeError):
            processor = None
        save_with_processor(model, output_dir, vocab_path, preset="clip", overwrite=overwrite, processor=processor)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="directory of a saved transformers CLIPModel")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument(
        "--vocab", help="tokenizer for a folder without a processor: bpe_simple_vocab_16e6.txt.gz or a CLIP folder"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    args = parser.parse_args(argv)
    try:
        convert(args.input, args.output, args.overwrite, args.vocab)
    except (FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"saved MS-CLIP model to {args.output}")


if __name__ == "__main__":
    main()
