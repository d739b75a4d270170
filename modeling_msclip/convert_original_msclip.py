"""Convert an official MS-CLIP checkpoint (Hxyou/MSCLIP) into an `MSClipModel` directory.

    python -m modeling_msclip.convert_original_msclip --config CFG --checkpoint CKPT --output DIR --vocab BPE_GZ

``CFG`` is an official experiment YAML (its ``BASE:`` files are resolved relative to its own folder) or a JSON/YAML
file holding the merged official config tree (``MODEL``, ``CUSTOM``, ``TRAIN``/``TEST``). ``CKPT`` is an official
``.pth`` (loaded with ``weights_only=True``; a nested ``state_dict``/``model`` entry and ``module.`` prefixes are
accepted) or a ``.safetensors`` state dict. The official state dict stores every shared tensor twice (once under the
vision key, once under the text key); the converter checks that both copies agree and keeps one.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from .configuration_msclip import MSClipConfig
from .modeling_msclip import MSClipModel

logger = logging.getLogger(__name__)

# Official (yacs) defaults for the options this converter reads; anything else in CUSTOM must be off.
OFFICIAL_CUSTOM_DEFAULTS: dict[str, Any] = {
    "SHARE_MODULES": [],
    "N_LAYERS": 0,
    "SHARE_BOTTOM_LAYER": False,
    "VISUAL_LAYER_MINUS1": False,
    "EARLY_CONV": False,
    "EARLY_CONV_NEW_IMPLEMENT": False,
    "EARLY_CONV_RES": False,
    "EARLY_CONV_RES_FIRSTCONV_KERNEL": 3,
    "EARLY_CONV_RES_BLOCK": "basic_v0",
    "EARLY_CONV_RES_LAYERS": [1, 1, 1, 1],
    "EARLY_CONV_RES_STRIDES": [2, 2, 2, 2],
    "PARALLEL_IN_V": False,
    "PARALLEL_N_LAYERS": 5,
    "PARALLEL_LATERAL_LAYER": [2, 4, 6, 8, 10],
    "PARALLEL_KERNELS": [3, 3, 3, 3, 3],
    "PARALLEL_PADDINGS": [1, 1, 1, 1, 1],
    "PARALLEL_STRIDES": [2, 2, 2, 2, 2],
    "PARALLEL_RESNET": False,
    "PARALLEL_RESNET_LAYERS": [0, 1, 1, 1, 1],
    "PRALLEL_T2B_KERNELS": [16, 8, 4, 2, 1],
    "PRALLEL_T2B_PADDINGS": [0, 0, 0, 0, 0],
    "PRALLEL_T2B_STRIDES": [16, 8, 4, 2, 1],
    "PRALLEL_T2B_USECLS": False,
}
# Options of the official code that only affect training, evaluation or unsupported research variants we refuse.
IGNORED_CUSTOM_KEYS = {"LR_SHARE", "WD_SHARE", "LORA_WHERE_ADD", "CUSTOM_ATTN"}
SHARE_MODULES_TO_COMPONENTS = {
    "attn.in_proj_weight": "attention",
    "attn.in_proj_bias": "attention",
    "attn.out_proj": "attention",
    "mlp": "mlp",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
OFFICIAL_LAYER_NORM_EPS = 1e-12


class ConversionError(ValueError):
    """The official config or checkpoint cannot be converted faithfully."""


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


def load_official_config(path: str | Path) -> dict[str, Any]:
    """Read an official experiment YAML (following ``BASE:``) or a JSON/YAML merged config tree."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"config file not found: {path}")
    text = path.read_text()
    tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(tree, dict):
        raise ConversionError(f"{path} does not hold a config mapping")
    if "merged_official_config" in tree:
        tree = tree["merged_official_config"]
    bases = tree.pop("BASE", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        if not base:
            continue
        _deep_update(merged, load_official_config(path.parent / base))
    _deep_update(merged, tree)
    if "MODEL" not in merged:
        raise ConversionError(f"{path} has no MODEL section; expected an official MS-CLIP config")
    return merged


def _deep_update(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _image_size(tree: dict[str, Any]) -> int:
    for section, key in (("TRAIN", "IMAGE_SIZE"), ("TEST", "IMAGE_SIZE")):
        size = tree.get(section, {}).get(key) if isinstance(tree.get(section), dict) else None
        size = size or tree.get(f"{section}_{key}")
        if size:
            sizes = size if isinstance(size, list) else [size, size]
            if sizes[0] != sizes[1]:
                raise ConversionError(f"non-square image size {sizes} is not supported")
            return int(sizes[0])
    return 224


def config_from_official(tree: dict[str, Any]) -> MSClipConfig:
    """Translate a merged official config tree into an `MSClipConfig` (refusing options we cannot reproduce)."""
    try:
        spec = tree["MODEL"]["SPEC"]
        vision_spec, text_spec = spec["VISION"], spec["TEXT"]
    except KeyError as error:
        raise ConversionError(f"official config lacks MODEL.SPEC.{error.args[0]}") from error
    custom = {**OFFICIAL_CUSTOM_DEFAULTS, **(tree.get("CUSTOM") or {})}
    unsupported = {
        key: value
        for key, value in custom.items()
        if key not in OFFICIAL_CUSTOM_DEFAULTS and key not in IGNORED_CUSTOM_KEYS and value not in (False, None, [], 0)
    }
    if unsupported:
        raise ConversionError(f"unsupported official options are switched on: {unsupported}")
    if custom["SHARE_BOTTOM_LAYER"] or custom["VISUAL_LAYER_MINUS1"]:
        raise ConversionError("SHARE_BOTTOM_LAYER / VISUAL_LAYER_MINUS1 variants are not supported")

    share_modules = list(custom["SHARE_MODULES"])
    unknown = [m for m in share_modules if m not in SHARE_MODULES_TO_COMPONENTS]
    if unknown:
        raise ConversionError(f"unknown SHARE_MODULES entries {unknown}")
    attention_parts = {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj"}
    if attention_parts & set(share_modules) and not attention_parts <= set(share_modules):
        raise ConversionError(
            f"SHARE_MODULES shares only part of the attention ({share_modules}); "
            "MS-CLIP shares all of in_proj_weight, in_proj_bias and out_proj or none"
        )
    components = sorted({SHARE_MODULES_TO_COMPONENTS[m] for m in share_modules})

    width = int(vision_spec["WIDTH"])
    layers = int(vision_spec["LAYERS"])
    vision: dict[str, Any] = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": width // 64,
        "image_size": _image_size(tree),
        "patch_size": int(vision_spec["PATCH_SIZE"]),
        "layer_norm_eps": OFFICIAL_LAYER_NORM_EPS,
    }
    if custom["EARLY_CONV"]:
        if not (custom["EARLY_CONV_NEW_IMPLEMENT"] and custom["EARLY_CONV_RES"]):
            raise ConversionError(
                "only the residual early-conv stem (EARLY_CONV_NEW_IMPLEMENT + EARLY_CONV_RES) "
                "of MS-CLIP-S is supported"
            )
        if (
            custom["EARLY_CONV_RES_BLOCK"],
            custom["EARLY_CONV_RES_LAYERS"],
            custom["EARLY_CONV_RES_FIRSTCONV_KERNEL"],
        ) != ("basic_v0", [1, 1, 1, 1], 3):
            raise ConversionError("only the basic_v0 stem with layers [1,1,1,1] and a 3x3 first conv is supported")
        vision.update(embedding_type="conv_stem", conv_stem_strides=list(custom["EARLY_CONV_RES_STRIDES"]))
    if custom["PARALLEL_IN_V"]:
        if not custom["PARALLEL_RESNET"] or custom["PARALLEL_RESNET_LAYERS"] != [0, 1, 1, 1, 1]:
            raise ConversionError("only the ResNet parallel branch with layers [0,1,1,1,1] is supported")
        if (
            custom["PARALLEL_N_LAYERS"] != 5
            or custom["PARALLEL_KERNELS"] != [3] * 5
            or custom["PARALLEL_PADDINGS"] != [1] * 5
        ):
            raise ConversionError("only a 5-stage parallel branch with 3x3 kernels and padding 1 is supported")
        if custom["PRALLEL_T2B_KERNELS"] != custom["PRALLEL_T2B_STRIDES"] or any(custom["PRALLEL_T2B_PADDINGS"]):
            raise ConversionError("lateral adapters need kernel == stride and no padding")
        vision.update(
            parallel_branch_strides=list(custom["PARALLEL_STRIDES"]),
            parallel_branch_lateral_layers=list(custom["PARALLEL_LATERAL_LAYER"]),
            parallel_branch_lateral_kernels=list(custom["PRALLEL_T2B_KERNELS"]),
            parallel_branch_use_cls=bool(custom["PRALLEL_T2B_USECLS"]),
        )
    text_width = int(text_spec["WIDTH"])
    text = {
        "vocab_size": int(text_spec.get("VOCAB_SIZE", 49408)),
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "num_hidden_layers": int(text_spec["LAYERS"]),
        "num_attention_heads": int(text_spec["HEADS"]),
        "max_position_embeddings": int(text_spec.get("CONTEXT_LENGTH", 77)),
        "layer_norm_eps": OFFICIAL_LAYER_NORM_EPS,
        # The official code pools at argmax(input_ids), also on rows whose end token was truncated away.
        "pooling": "argmax",
    }
    positions = max(layers, text["num_hidden_layers"])
    first_shared = int(custom["N_LAYERS"])
    shared_components = [list(components) if i >= first_shared else [] for i in range(positions)]
    return MSClipConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=int(spec["EMBED_DIM"]),
        shared_components=shared_components,
        logit_scale_init_value=1.0,
    )


# --------------------------------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------------------------------

_BLOCK_PARTS = [
    ("self_attn", "qkv_proj.weight", "attn.in_proj_weight"),
    ("self_attn", "qkv_proj.bias", "attn.in_proj_bias"),
    ("self_attn", "out_proj.weight", "attn.out_proj.weight"),
    ("self_attn", "out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm1", "weight", "ln_1.weight"),
    ("layer_norm1", "bias", "ln_1.bias"),
    ("mlp", "fc1.weight", "mlp.c_fc.weight"),
    ("mlp", "fc1.bias", "mlp.c_fc.bias"),
    ("mlp", "fc2.weight", "mlp.c_proj.weight"),
    ("mlp", "fc2.bias", "mlp.c_proj.bias"),
    ("layer_norm2", "weight", "ln_2.weight"),
    ("layer_norm2", "bias", "ln_2.bias"),
]
_TOWER_PREFIX = {"text": "transformer.resblocks", "vision": "visual.transformer.resblocks"}
# (head component, parameter, official key per modality) of `MSClipProjectionHead`.
_HEAD_PARTS = [
    ("final_layer_norm", "weight", {"text": "ln_final.weight", "vision": "visual.ln_post.weight"}),
    ("final_layer_norm", "bias", {"text": "ln_final.bias", "vision": "visual.ln_post.bias"}),
    ("projection", "weight", {"text": "text_projection", "vision": "visual.proj"}),
]
_PROJECTION_PREFIX = "projection_head.projection."
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn_keys(ours: str, conv: str, bn: str) -> dict[str, str]:
    keys = {f"{ours}.0.weight": f"{conv}.weight"}
    keys.update({f"{ours}.1.{name}": f"{bn}.{name}" for name in _BATCH_NORM})
    return keys


def official_key_map(config: MSClipConfig) -> dict[str, list[str]]:
    """Map every `MSClipModel` state-dict key to the official key(s) holding the same tensor.

    Shared block and head components map to two official keys (the vision copy first, then the text copy).
    """
    keys: dict[str, list[str]] = {}

    def add(ours: str, *official: str) -> None:
        keys[ours] = list(official)

    add("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
    add("text_model.embeddings.position_embedding", "positional_embedding")
    add("logit_scale", "logit_scale")
    add("vision_model.embeddings.class_embedding", "visual.class_embedding")
    add("vision_model.embeddings.position_embedding", "visual.positional_embedding")
    for name in ("weight", "bias"):
        add(f"vision_model.embeddings.pre_layernorm.{name}", f"visual.ln_pre.{name}")
    shared_head = set(config.shared_head_components)
    for component, suffix, official in _HEAD_PARTS:
        module = f"projection_head.{component}"
        if component in shared_head:
            add(f"{module}.shared.{suffix}", official["vision"], official["text"])
        else:
            for modality in ("text", "vision"):
                add(f"{module}.{modality}.{suffix}", official[modality])

    vision = config.vision_config
    if vision.embedding_type == "patch":
        add("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight")
    else:
        stem, official_stem = "vision_model.embeddings.patch_embedding", "visual.transformer.resblocks.0"
        pairs = _conv_bn_keys(f"{stem}.first_conv", f"{official_stem}.conv1", f"{official_stem}.bn1")
        for stage in range(len(vision.conv_stem_strides)):
            official_stage = f"{official_stem}.resnet_stage.conv_{stage}"
            pairs.update(
                _conv_bn_keys(f"{stem}.stages.{stage}.conv", f"{official_stage}.conv1", f"{official_stage}.bn1")
            )
            pairs.update(
                _conv_bn_keys(
                    f"{stem}.stages.{stage}.shortcut",
                    f"{official_stage}.downsample.0",
                    f"{official_stage}.downsample.1",
                )
            )
        pairs[f"{stem}.last_conv.weight"] = f"{official_stem}.last_conv.weight"
        for ours, official in pairs.items():
            add(ours, official)

    if vision.parallel_branch_strides is not None:
        branch, official_branch = "vision_model.parallel_branch", "visual.transformer.parallel_branch_v"
        pairs = _conv_bn_keys(f"{branch}.first_stage", f"{official_branch}.0.conv", f"{official_branch}.0.bn")
        for stage in range(1, len(vision.parallel_branch_strides)):
            block, official_block = (
                f"{branch}.bottlenecks.{stage - 1}",
                f"{official_branch}.{stage}.resnet_stage.conv_0",
            )
            for ours_name, conv, bn in (
                ("reduce", "conv1", "bn1"),
                ("spatial", "conv2", "bn2"),
                ("expand", "conv3", "bn3"),
                ("shortcut", "residual_conv", "residual_bn"),
            ):
                pairs.update(
                    _conv_bn_keys(f"{block}.{ours_name}", f"{official_block}.{conv}", f"{official_block}.{bn}")
                )
        for stage in range(len(vision.parallel_branch_strides)):
            adapter = f"vision_model.lateral_adapters.{stage}"
            official_adapter = f"visual.transformer.parallel_lateral_adapter.{stage}"
            pairs.update(
                _conv_bn_keys(
                    f"{adapter}.branch_depthwise",
                    f"{official_adapter}.top2bottom_dw_conv.conv",
                    f"{official_adapter}.top2bottom_dw_conv.bn",
                )
            )
            pairs[f"{adapter}.branch_pointwise.weight"] = f"{official_adapter}.top2bottom_pw_conv.conv.weight"
            pairs.update(
                _conv_bn_keys(
                    f"{adapter}.token_depthwise",
                    f"{official_adapter}.bottom_dw_conv.conv",
                    f"{official_adapter}.bottom_dw_conv.bn",
                )
            )
            for name in ("weight", "bias"):
                pairs[f"{adapter}.layer_norm.{name}"] = f"{official_adapter}.ln_adapt.{name}"
        for ours, official in pairs.items():
            add(ours, official)

    component_of = {"self_attn": "attention", "mlp": "mlp", "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2"}
    for position in range(config.num_block_positions):
        modalities = config.layer_modalities(position)
        shared = set(config.shared_components[position])
        for module, suffix, official_suffix in _BLOCK_PARTS:
            if component_of[module] in shared:
                add(
                    f"encoder.layers.{position}.{module}.shared.{suffix}",
                    *(f"{_TOWER_PREFIX[m]}.{position}.{official_suffix}" for m in ("vision", "text")),
                )
            else:
                for modality in modalities:
                    add(
                        f"encoder.layers.{position}.{module}.{modality}.{suffix}",
                        f"{_TOWER_PREFIX[modality]}.{position}.{official_suffix}",
                    )
    return keys


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load an official ``.pth`` or ``.safetensors`` state dict, unwrapping ``state_dict``/``model`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict: Any = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state_dict, dict) and not any(isinstance(v, torch.Tensor) for v in state_dict.values()):
        nested = next((state_dict[k] for k in ("state_dict", "model") if k in state_dict), None)
        if nested is None:
            raise ConversionError(f"{path} holds no tensors (top-level keys: {list(state_dict)[:10]})")
        state_dict = nested
    if not isinstance(state_dict, dict):
        raise ConversionError(f"{path} does not hold a state dict")
    return {re.sub(r"^module\.", "", key): value for key, value in state_dict.items()}


def convert_state_dict(official: dict[str, torch.Tensor], config: MSClipConfig) -> dict[str, torch.Tensor]:
    """Build an `MSClipModel` state dict from an official one, checking keys and shared-tensor copies."""
    key_map = official_key_map(config)
    expected = {key for sources in key_map.values() for key in sources}
    missing = sorted(expected - official.keys())
    unexpected = sorted(official.keys() - expected)
    if missing or unexpected:
        raise ConversionError(
            f"official checkpoint does not match the config: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    converted: dict[str, torch.Tensor] = {}
    for ours, sources in key_map.items():
        tensor = official[sources[0]]
        for other in sources[1:]:
            if official[other].shape != tensor.shape or not torch.equal(official[other], tensor):
                raise ConversionError(f"the two official copies of a shared tensor disagree: {sources[0]} vs {other}")
        if ours.startswith(_PROJECTION_PREFIX):
            tensor = tensor.t()  # the official projections are (width, embed) matrices applied as x @ proj
        elif ours == "logit_scale":
            tensor = tensor.reshape(1)
        converted[ours] = tensor.contiguous().clone()
    return converted


def convert(
    config_path: str | Path,
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    vocab_path: str | Path | None = None,
    overwrite: bool = False,
) -> MSClipModel:
    """Convert an official config + checkpoint into an `MSClipModel` (saved with its processor when asked)."""
    config = config_from_official(load_official_config(config_path))
    state_dict = convert_state_dict(load_official_state_dict(checkpoint_path), config)
    model = MSClipModel(config)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    if output_dir is not None:
        save_with_processor(model, output_dir, vocab_path, preset="msclip", overwrite=overwrite)
    return model


def save_with_processor(
    model: MSClipModel,
    output_dir: str | Path,
    vocab_path: str | Path | None,
    preset: str,
    overwrite: bool,
    processor: Any | None = None,
) -> bool:
    """Save ``model`` with ``processor``, else with one built from ``vocab_path``, into ``output_dir``.

    Without either, only the model is saved and a warning says how to add a processor (``AutoProcessor`` would
    otherwise fail later with a generic message). Returns whether a processor was written.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass --overwrite to replace its contents")
    model.save_pretrained(output_dir)
    if processor is None and vocab_path is not None:
        from .processing_msclip import build_msclip_processor

        image_size = model.config.vision_config.image_size
        processor = build_msclip_processor(vocab_path, preset=preset, image_size=image_size)
    if processor is None:
        logger.warning(
            "%s holds the model but no processor, so AutoProcessor.from_pretrained will not load it: convert again "
            "with --vocab (bpe_simple_vocab_16e6.txt.gz or a CLIP vocab.json + merges.txt folder), or save an "
            "MSClipProcessor into it (docs/processor.md)",
            output_dir,
        )
        return False
    processor.save_pretrained(output_dir)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="official experiment YAML or merged config JSON/YAML")
    parser.add_argument("--checkpoint", required=True, help="official .pth or .safetensors state dict")
    parser.add_argument("--output", required=True, help="output directory (model + processor)")
    parser.add_argument(
        "--vocab", help="tokenizer: bpe_simple_vocab_16e6.txt.gz or a CLIP vocab.json + merges.txt folder"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    args = parser.parse_args(argv)
    try:
        convert(args.config, args.checkpoint, args.output, args.vocab, args.overwrite)
    except (ConversionError, FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"saved MS-CLIP model to {args.output}")


if __name__ == "__main__":
    main()
