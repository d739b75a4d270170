"""Convert an open_clip CLIP checkpoint (ViT towers, OpenAI layout) into an `MSClipModel` with nothing shared.

    python -m modeling_msclip.convert_open_clip --checkpoint open_clip_pytorch_model.bin --model_config ViT-B-32.json \
        --output DIR [--vocab bpe_simple_vocab_16e6.txt.gz]

``--model_config`` is open_clip's model config JSON (``model_configs/ViT-B-32.json`` and friends: ``embed_dim``,
``vision_cfg``, ``text_cfg``, ``quick_gelu``); the checkpoint is a ``.pt``/``.bin`` or ``.safetensors`` state dict
(a nested ``state_dict`` and ``module.`` prefixes are unwrapped). Supported: the standard CLIP layouts of
ViT-B/32, B/16, L/14 and their sizes in between, QuickGELU or GELU, any context length and vocabulary. Settings that
change the computation in ways `MSClipModel` does not reproduce (timm or Hugging Face towers, layer scale,
attentional or average pooling, bidirectional text, projection biases, SigLIP's logit bias, ...) are refused by name.

open_clip's CLIP uses OpenAI CLIP's parameter names, the same as the official MS-CLIP code's vanilla CLIP, so the
tensors go through `convert_original_msclip.convert_state_dict`. Text is pooled at ``argmax(input_ids)`` as open_clip
does with the CLIP tokenizer, and open_clip's LayerNorm eps of 1e-5 is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .configuration_msclip import MSClipConfig
from .convert_original_msclip import (
    ConversionError,
    convert_state_dict,
    load_official_state_dict,
    save_with_processor,
)
from .modeling_msclip import MSClipModel

OPEN_CLIP_LAYER_NORM_EPS = 1e-5
# open_clip settings and the only value of each that MSClipModel computes exactly.
_VISION_DEFAULTS = {
    "head_width": 64,
    "mlp_ratio": 4.0,
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "input_patchnorm": False,
    "global_average_pool": False,
    "attentional_pool": False,
    "pool_type": "tok",
    "final_ln_after_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "output_tokens": False,
    "timm_model_name": None,
    "act_kwargs": None,
    "norm_kwargs": None,
}
_TEXT_DEFAULTS = {
    "mlp_ratio": 4.0,
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": 0,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "output_tokens": False,
    "hf_model_name": None,
    "act_kwargs": None,
    "norm_kwargs": None,
}
# Keys of old OpenAI / open_clip checkpoints that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# Runtime flags of the open_clip config that do not change the computation.
_IGNORED_KEYS = {"output_tokens", "patch_dropout", "custom_text", "cast_dtype", "init_logit_scale"}


def _checked(section: dict[str, Any], defaults: dict[str, Any], name: str) -> None:
    unsupported = {
        key: value
        for key, value in section.items()
        if key in defaults and key not in _IGNORED_KEYS and value != defaults[key] and value is not None
    }
    if section.get("timm_model_name") or section.get("hf_model_name"):
        unsupported["tower"] = section.get("timm_model_name") or section.get("hf_model_name")
    for key in ("head_width", "mlp_ratio"):  # sizes that change shapes are read, not refused
        unsupported.pop(key, None)
    if unsupported:
        raise ConversionError(f"open_clip {name} settings that MSClipModel does not reproduce: {unsupported}")


def config_from_open_clip(model_config: dict[str, Any]) -> MSClipConfig:
    """An `MSClipConfig` (nothing shared) with the sizes of an open_clip model config."""
    try:
        vision, text = dict(model_config["vision_cfg"]), dict(model_config["text_cfg"])
        embed_dim = int(model_config["embed_dim"])
    except KeyError as error:
        raise ConversionError(f"open_clip model config lacks {error.args[0]!r}") from error
    if not isinstance(vision.get("layers", 12), int):
        raise ConversionError(f"ResNet vision towers (layers={vision['layers']}) are not supported; only ViTs are")
    if model_config.get("init_logit_bias") is not None:
        raise ConversionError("SigLIP checkpoints (init_logit_bias) are not supported")
    _checked(vision, _VISION_DEFAULTS, "vision_cfg")
    _checked(text, _TEXT_DEFAULTS, "text_cfg")
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ConversionError(f"non-square image size {image_size} is not supported")
        image_size = image_size[0]
    activation = "quick_gelu" if model_config.get("quick_gelu", False) else "gelu"
    vision_width, text_width = int(vision.get("width", 768)), int(text.get("width", 512))
    vocab_size = int(text.get("vocab_size", 49408))
    return MSClipConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_width,
            "intermediate_size": int(text_width * float(text.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(text.get("layers", 12)),
            "num_attention_heads": int(text.get("heads", 8)),
            "max_position_embeddings": int(text.get("context_length", 77)),
            "hidden_act": activation,
            "layer_norm_eps": OPEN_CLIP_LAYER_NORM_EPS,
            "pooling": "argmax",
            "pad_token_id": 0,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * float(vision.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(vision.get("layers", 12)),
            "num_attention_heads": vision_width // int(vision.get("head_width", 64)),
            "image_size": int(image_size),
            "patch_size": int(vision.get("patch_size", 16)),
            "hidden_act": activation,
            "layer_norm_eps": OPEN_CLIP_LAYER_NORM_EPS,
        },
        projection_dim=embed_dim,
        logit_scale_init_value=2.6592,
    )


def open_clip_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-layout tensors of an open_clip state dict (custom-text ``text.`` prefixes and buffers removed)."""
    tensors = {}
    for key, value in state.items():
        if key in _NON_PARAMETER_KEYS or key.endswith(".attn_mask"):
            continue
        if key == "logit_bias":
            raise ConversionError("SigLIP checkpoints (logit_bias) are not supported")
        tensors[key.removeprefix("text.")] = value
    return tensors


def convert(
    checkpoint_path: str | Path,
    model_config_path: str | Path,
    output_dir: str | Path | None = None,
    vocab_path: str | Path | None = None,
    overwrite: bool = False,
) -> MSClipModel:
    """Convert an open_clip checkpoint into an `MSClipModel` (saved with a processor from ``vocab_path``)."""
    model_config_path = Path(model_config_path)
    if not model_config_path.is_file():
        raise FileNotFoundError(f"open_clip model config not found: {model_config_path}")
    model_config = json.loads(model_config_path.read_text())
    config = config_from_open_clip(model_config.get("model_cfg", model_config))
    state = open_clip_state_dict(load_official_state_dict(checkpoint_path))
    model = MSClipModel(config)
    converted, expected = convert_state_dict(state, config), model.state_dict()
    mismatched = [
        f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} from {model_config_path.name}"
        for key, value in converted.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        raise ConversionError(
            f"{checkpoint_path} does not fit the model config {model_config_path} (was it trained with another "
            "config?): "
            + "; ".join(mismatched[:5])
            + (f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
        )
    model.load_state_dict(converted, strict=True)
    model.eval()
    if output_dir is not None:
        save_with_processor(model, output_dir, vocab_path, preset="clip", overwrite=overwrite)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="open_clip state dict (.pt / .bin / .safetensors)")
    parser.add_argument(
        "--model_config", "--model-config", required=True, help="open_clip model config JSON (e.g. ViT-B-32.json)"
    )
    parser.add_argument("--output", required=True, help="output directory (model + processor)")
    parser.add_argument(
        "--vocab", help="tokenizer: bpe_simple_vocab_16e6.txt.gz or a CLIP vocab.json + merges.txt folder"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint, args.model_config, args.output, args.vocab, args.overwrite)
    except (ConversionError, FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"saved MS-CLIP model to {args.output}")


if __name__ == "__main__":
    main()
