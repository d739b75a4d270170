"""Padding is never computed: 77-wide batches, trimmed batches and dynamically padded batches give the same outputs,
losses and gradients, for every sharing preset and attention backend."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_scale

from modeling_msclip import MSClipConfig, MSClipModel, MSClipTokenizer

PRESETS = ["msclip-s-tiny", "msclip-tiny", "clip-tiny", "single-tower-tiny"]
CAPTIONS = [
    "a red circle",
    "a picture of a large blue square in the middle of a white canvas next to a tiny green star",
    "two shapes",
]
FULL_CAPTION = " ".join(["shape"] * 75)  # 75 tokens + start + end = all 77 positions


def run(model: MSClipModel, batch: dict[str, torch.Tensor], pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    output = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels, return_loss=True
    )
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {
        "text": output.text_model_output.pooler_output.detach(),
        "logits": output.logits_per_image.detach(),
        "loss": output.loss.detach(),
        **{f"grad:{k}": v for k, v in grads.items()},
    }


def assert_same(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Equal relative to each tensor's scale: float64 to 1e-10 (the trimming is exact, only rounding differs),
    float32 to 1e-5 (the rounding of differently shaped float32 kernels)."""
    assert got.keys() == reference.keys()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for key, value in reference.items():
        assert_close_to_scale(got[key], value, tolerance, key)


# Short captions only, so that trimming and dynamic padding really drop columns; one case adds a caption that
# fills all 77 positions (nothing can be dropped, the end token sits at the last position).
CASES = [
    *[
        (preset, attn_implementation, False, torch.float64)
        for preset in PRESETS
        for attn_implementation in ("eager", "sdpa")
    ],
    ("msclip-s-tiny", "sdpa", False, torch.float32),
    ("single-tower-tiny", "eager", True, torch.float32),
]


@pytest.mark.parametrize(("preset", "attn_implementation", "with_full_caption", "dtype"), CASES)
def test_trimmed_and_dynamic_batches_equal_full_width(
    msclip_tokenizer_dir, preset, attn_implementation, with_full_caption, dtype
):
    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    captions = CAPTIONS + ([FULL_CAPTION] if with_full_caption else [])
    wide = tokenizer(captions, padding="max_length", return_tensors="pt")
    dynamic = tokenizer(captions, return_tensors="pt")  # default: pad to the longest caption
    assert wide["input_ids"].shape[1] == 77
    assert dynamic["input_ids"].shape[1] == (77 if with_full_caption else int(wide["attention_mask"].sum(1).max()))
    if with_full_caption:
        assert wide["input_ids"][-1, 76] == tokenizer.eos_token_id

    torch.manual_seed(0)
    config = MSClipConfig.from_preset(preset)
    model = MSClipModel._from_config(config, attn_implementation=attn_implementation).to(dtype).train()
    pixels = torch.randn(len(captions), 3, 64, 64, dtype=dtype)

    model.config.text_config.trim_padding = False
    reference = run(model, wide, pixels)
    model.config.text_config.trim_padding = True
    for batch in (wide, dynamic):
        assert_same(run(model, batch, pixels), reference, dtype)


def test_trimming_reaches_the_blocks_and_keeps_hidden_state_positions(msclip_tokenizer_dir):
    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    wide = tokenizer(CAPTIONS, padding="max_length", return_tensors="pt")
    longest = int(wide["attention_mask"].sum(1).max())
    model = MSClipModel(MSClipConfig.from_preset("msclip-s-tiny")).eval()
    seen_lengths = []
    hook = model.encoder.layers[5].register_forward_hook(
        lambda module, args, output: seen_lengths.append(args[0].shape[1]) if args[1] == "text" else None
    )
    with torch.no_grad():
        trimmed = model.get_text_features(**wide, output_hidden_states=True)
        model.config.text_config.trim_padding = False
        full = model.get_text_features(**wide, output_hidden_states=True)
    hook.remove()
    assert seen_lengths == [longest, 77], "the blocks must only run the positions up to the longest caption"
    assert trimmed.last_hidden_state.shape[1] == longest and full.last_hidden_state.shape[1] == 77
    for trimmed_state, full_state in zip(trimmed.hidden_states, full.hidden_states, strict=True):
        assert_close_to_scale(trimmed_state, full_state[:, :longest], 1e-5, "trimmed hidden state")


def test_gradient_checkpointing_with_trimming(msclip_tokenizer_dir):
    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    wide = tokenizer(CAPTIONS, padding="max_length", return_tensors="pt")
    torch.manual_seed(0)
    model = MSClipModel._from_config(MSClipConfig.from_preset("msclip-tiny"), attn_implementation="sdpa")
    model = model.double().train()
    pixels = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    model.config.text_config.trim_padding = False
    reference = run(model, wide, pixels)
    model.config.text_config.trim_padding = True
    model.activation_checkpointing_enable()
    assert_same(run(model, wide, pixels), reference, torch.float64)
