"""Export an `MSClipModel` with nothing shared to a transformers ``CLIPModel`` folder.

    python -m modeling_msclip.convert_to_clip --input MSCLIP_DIR --output CLIP_DIR

A model trained here then loads wherever CLIP loads (``CLIPModel.from_pretrained``, pipelines, other libraries)
and computes the same embeddings and logits. Only what ``CLIPModel`` can express is exported: separate towers with
nothing shared (blocks or head), a patch-embedding vision tower without the parallel branch, causal text attention
and one final LayerNorm and projection per modality; anything else is refused with the reason. Text pooling: a
model with ``text_config.pooling="eos"`` keeps its end id; one with ``"argmax"`` (the presets) pools at its end token,
which is its largest id, so the two agree on every row that has its end token. The processor of the input folder
is saved alongside.

This is the inverse of `modeling_msclip.convert_clip`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPConfig, CLIPModel

from .configuration_msclip import MSClipConfig
from .convert_clip import _LAYER_PARTS, TEXT_FIELDS, TOP_LEVEL_KEYS, VISION_FIELDS
from .modeling_msclip import MSClipModel


def check_exportable(config: MSClipConfig) -> None:
    """Raise a ValueError naming the first feature of ``config`` that a transformers ``CLIPModel`` cannot express."""
    text, vision = config.text_config, config.vision_config
    reasons = []
    if any(config.shared_components):
        reasons.append(f"blocks {config.shared_block_positions} share components between the towers")
    if vision.embedding_type != "patch":
        reasons.append(f"the vision tower uses embedding_type={vision.embedding_type!r}, not a patch embedding")
    if vision.parallel_branch_strides is not None:
        reasons.append("the vision tower has MS-CLIP-S's parallel branch")
    if config.shared_head_components:
        reasons.append(f"the towers share head components {config.shared_head_components}")
    if not text.causal:
        reasons.append("text attention is bidirectional")
    if text.pooling == "eos" and text.eos_token_id == 2:
        reasons.append("eos_token_id 2 would make transformers' CLIP pool at argmax(input_ids)")
    if reasons:
        raise ValueError("this model cannot be exported to a transformers CLIPModel: " + "; ".join(reasons))


def clip_config_from(config: MSClipConfig) -> CLIPConfig:
    """The ``CLIPConfig`` with the sizes of an exportable `MSClipConfig`."""
    check_exportable(config)
    text, vision = config.text_config, config.vision_config
    return CLIPConfig(
        text_config={name: getattr(text, name) for name in TEXT_FIELDS},
        vision_config={name: getattr(vision, name) for name in VISION_FIELDS},
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )


def to_clip_state_dict(state: dict[str, torch.Tensor], config: MSClipConfig) -> dict[str, torch.Tensor]:
    """Rename (and split q/k/v of) an `MSClipModel` state dict into transformers ``CLIPModel`` keys."""
    clip = {theirs: state[ours] for ours, theirs in TOP_LEVEL_KEYS.items()}
    clip["logit_scale"] = clip["logit_scale"].reshape(())
    for modality, tower in (("text", config.text_config), ("vision", config.vision_config)):
        for layer in range(tower.num_hidden_layers):
            source, target = f"encoder.layers.{layer}.", f"{modality}_model.encoder.layers.{layer}."
            for clip_suffix, ours in _LAYER_PARTS.items():
                clip[target + clip_suffix] = state[source + ours.format(m=modality)]
            for part in ("weight", "bias"):
                fused = state[f"{source}self_attn.{modality}.qkv_proj.{part}"]
                for name, piece in zip(("q", "k", "v"), fused.chunk(3, dim=0), strict=True):
                    clip[f"{target}self_attn.{name}_proj.{part}"] = piece
    return {key: value.contiguous().clone() for key, value in clip.items()}


def convert_to_clip(model: MSClipModel) -> CLIPModel:
    """The transformers ``CLIPModel`` that computes what ``model`` computes (see the module docstring)."""
    clip = CLIPModel(clip_config_from(model.config))
    clip.load_state_dict(to_clip_state_dict(model.state_dict(), model.config), strict=True)
    return clip.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="saved MSClipModel / MSClipForPreTraining folder")
    parser.add_argument("--output", required=True, help="output folder for the transformers CLIPModel")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    args = parser.parse_args(argv)
    source, output = Path(args.input), Path(args.output)
    if not source.is_dir():
        parser.exit(2, f"error: --input {source} is not a directory (a saved MS-CLIP model folder)\n")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        parser.exit(2, f"error: {output} is not empty; pass --overwrite to replace its contents\n")
    model = MSClipModel.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source) if (source / "tokenizer_config.json").is_file() else None
    end_id = getattr(getattr(processor, "tokenizer", None), "eos_token_id", model.config.text_config.eos_token_id)
    if end_id != model.config.text_config.eos_token_id:
        parser.exit(
            2,
            f"error: the processor's end id {end_id} is not the model's eos_token_id "
            f"{model.config.text_config.eos_token_id}: the exported CLIP would pool text at the wrong token\n",
        )
    try:
        clip = convert_to_clip(model)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    clip.save_pretrained(output)
    if processor is not None:
        processor.save_pretrained(output)
    print(f"saved transformers CLIPModel to {output}")


if __name__ == "__main__":
    main()
