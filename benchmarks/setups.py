"""The models and batches the benchmarks compare.

Our ``clip`` contender is built with `config_from_clip` from the transformers ``CLIPConfig`` of the other contender
and loaded with its converted weights, so both compute the same function with the same parameter count and the
same FLOPs per token (checked in `build_clip_pair`). MS-CLIP and MS-CLIP-S use the same widths and depths.

Caption lengths: CLIP-style alt-text captions are short. The benchmark draws the token count of each caption,
start and end tokens included, uniformly from 10..25 (`CAPTION_TOKENS`), which covers the typical range of
CC3M/CC12M/LAION captions after BPE (about 8-20 words). Token ids are random; only the lengths matter for speed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import CLIPConfig, CLIPModel

from modeling_msclip import MSClipConfig, MSClipModel
from modeling_msclip.convert_clip import config_from_clip, convert_clip_state_dict

START_ID, END_ID = 49406, 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
CAPTION_TOKENS = (10, 25)  # inclusive range of caption lengths in tokens, start/end included
# transformers' CLIP tokenizers pad with the end token; MS-CLIP's pads with id 0 (see tokenization_msclip).
HF_PAD_ID, MSCLIP_PAD_ID = END_ID, 0


@dataclass(frozen=True)
class BenchSize:
    """Model and batch sizes of one benchmark size (``--size``)."""

    name: str
    text_width: int
    text_layers: int
    text_heads: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    projection_dim: int
    batch_size: int

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def describe(self) -> str:
        return (
            f"text {self.text_layers}x{self.text_width} ({self.text_heads} heads), vision {self.vision_layers}x"
            f"{self.vision_width} ({self.vision_heads} heads), {self.image_size}px/{self.patch_size}, "
            f"projection {self.projection_dim}, vocab {VOCAB_SIZE}, batch {self.batch_size}"
        )


SIZES = {
    # For the harness's own test: every section runs in seconds; the numbers mean nothing.
    "tiny": BenchSize("tiny", 64, 6, 2, 64, 6, 2, 96, 16, 64, 4),
    # CPU-friendly: both towers 256 wide so that the MS-CLIP variants (one shared width) are directly comparable.
    "small": BenchSize("small", 256, 6, 4, 256, 6, 4, 96, 16, 256, 32),
    # OpenAI ViT-B/32 and ViT-B/16 sizes, for GPU runs.
    "b32": BenchSize("b32", 512, 12, 8, 768, 12, 12, 224, 32, 512, 256),
    "b16": BenchSize("b16", 512, 12, 8, 768, 12, 12, 224, 16, 512, 128),
}


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Captions:
    """The same captions padded the ways the benchmarks feed them."""

    lengths: torch.Tensor
    token_rows: list[torch.Tensor]

    def padded(self, length: int | None, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` right-padded to ``length`` (``None``: the longest caption)."""
        length = int(self.lengths.max()) if length is None else length
        input_ids = torch.full((len(self.token_rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, tokens in enumerate(self.token_rows):
            input_ids[row, : len(tokens)] = tokens
            attention_mask[row, : len(tokens)] = 1
        return input_ids, attention_mask


def make_captions(batch_size: int, seed: int = 0) -> Captions:
    """Random captions whose token counts are uniform in `CAPTION_TOKENS`."""
    generator = torch.Generator().manual_seed(seed)
    low, high = CAPTION_TOKENS
    lengths = torch.randint(low, high + 1, (batch_size,), generator=generator)
    rows = [
        torch.cat(
            [
                torch.tensor([START_ID]),
                torch.randint(1, START_ID, (n - 2,), generator=generator),
                torch.tensor([END_ID]),
            ]
        )
        for n in lengths.tolist()
    ]
    return Captions(lengths, rows)


def make_images(batch_size: int, image_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=generator)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def hf_clip_config(size: BenchSize) -> CLIPConfig:
    """A transformers ``CLIPConfig`` of ``size`` (QuickGELU, eos id 49407 as in OpenAI's checkpoints)."""
    return CLIPConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": size.text_width,
            "intermediate_size": 4 * size.text_width,
            "num_hidden_layers": size.text_layers,
            "num_attention_heads": size.text_heads,
            "max_position_embeddings": CONTEXT_LENGTH,
            "hidden_act": "quick_gelu",
            "bos_token_id": START_ID,
            "eos_token_id": END_ID,
            "pad_token_id": HF_PAD_ID,
        },
        vision_config={
            "hidden_size": size.vision_width,
            "intermediate_size": 4 * size.vision_width,
            "num_hidden_layers": size.vision_layers,
            "num_attention_heads": size.vision_heads,
            "image_size": size.image_size,
            "patch_size": size.patch_size,
            "hidden_act": "quick_gelu",
        },
        projection_dim=size.projection_dim,
    )


def parameter_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (a shared module counts once)."""
    return sum(p.numel() for p in model.parameters())


def build_clip_pair(size: BenchSize, seed: int = 0, attn_implementation: str = "sdpa") -> tuple[CLIPModel, MSClipModel]:
    """transformers ``CLIPModel`` and our equivalent with identical sizes and weights.

    Raises:
        RuntimeError: if the converted model does not have the same parameter count (it would not be a fair race).
    """
    torch.manual_seed(seed)
    hf = CLIPModel._from_config(hf_clip_config(size), attn_implementation=attn_implementation)
    config = config_from_clip(hf.config)
    ours = MSClipModel._from_config(config, attn_implementation=attn_implementation)
    ours.load_state_dict(convert_clip_state_dict(hf.state_dict(), config), strict=True)
    if parameter_count(hf) != parameter_count(ours):
        raise RuntimeError(f"parameter counts differ: CLIPModel {parameter_count(hf)}, ours {parameter_count(ours)}")
    return hf, ours


def msclip_config(size: BenchSize, variant: str, trim_padding: bool = True) -> MSClipConfig:
    """MS-CLIP (``"msclip"``: attention + MLP shared in every block) or MS-CLIP-S (``"msclip-s"``) at ``size``.

    The text width is raised to the vision width (sharing needs one width). At the ``b32``/``b16`` sizes the
    packaged presets are used as they are; at ``small`` the MS-CLIP-S stem, branch and lateral positions are
    adapted to the depth and token grid.
    """
    if variant not in ("msclip", "msclip-s"):
        raise ValueError(f"unknown MS-CLIP variant {variant!r}")
    text_override = {"trim_padding": trim_padding}
    if size.name in ("b32", "b16"):
        preset = {"msclip": "msclip-b32", "msclip-s": f"msclip-s-{size.name}"}[variant]
        if variant == "msclip" and size.name == "b16":
            return MSClipConfig.from_preset(preset, text_config=text_override, vision_config={"patch_size": 16})
        return MSClipConfig.from_preset(preset, text_config=text_override)
    width, layers, heads = size.vision_width, size.vision_layers, size.vision_heads
    tower = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers}
    tower |= {"num_attention_heads": heads, "layer_norm_eps": 1e-5}
    vision = tower | {"image_size": size.image_size, "patch_size": size.patch_size}
    shared = [["attention", "mlp"]] * layers
    if variant == "msclip-s":
        if size.patch_size != 16:
            raise ValueError("the small MS-CLIP-S benchmark model expects patch_size 16")
        shared = [[]] + [["attention", "mlp"]] * (layers - 1)
        grid = size.image_size // size.patch_size
        resolution, kernels = size.image_size, []
        for stride in (2, 2, 2, 2, 1):
            resolution = -(-resolution // stride)
            kernels.append(resolution // grid)
        vision |= {
            "embedding_type": "conv_stem",
            "conv_stem_strides": [2, 2, 2, 1],
            "parallel_branch_strides": [2, 2, 2, 2, 1],
            # five lateral adapters spread over the attention blocks 1 .. layers-1
            "parallel_branch_lateral_layers": [1 + round(i * (layers - 2) / 4) for i in range(5)],
            "parallel_branch_lateral_kernels": kernels,
        }
    return MSClipConfig(
        text_config=tower | text_override,
        vision_config=vision,
        projection_dim=size.projection_dim,
        shared_components=shared,
    )


def build_msclip(size: BenchSize, variant: str, seed: int = 0, trim_padding: bool = True) -> MSClipModel:
    torch.manual_seed(seed)
    return MSClipModel._from_config(msclip_config(size, variant, trim_padding), attn_implementation="sdpa")


def without_padding_trim(model: MSClipModel) -> MSClipModel:
    """A copy of ``model`` that runs every padded position (static shapes), with the same weights."""
    copied = copy.deepcopy(model)
    copied.config.text_config.trim_padding = False
    copied.text_model.config.trim_padding = False
    return copied
