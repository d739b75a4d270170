"""FLIP-style patch dropout (`MSClipVisionConfig.patch_dropout`): what it keeps, that it only acts while training,
that it really removes vision compute, and how bad settings are refused. Gradient caching with patch dropout is
tested in tests/test_gradcache.py (the re-forward keeps the same patches)."""

import copy

import pytest
import torch
from conftest import assert_close_to_scale
from torch.utils.flop_counter import FlopCounterMode

from modeling_msclip import MSClipConfig, MSClipModel
from modeling_msclip.pretraining_msclip import build_model, build_model_config

# clip-tiny at 64 px with 16 px patches: a 4 x 4 grid, so a dropout of 0.25 keeps 12 of 16 patches.
GRID_OVERRIDES = {"image_size": 64, "patch_size": 16}
NUM_PATCHES, KEPT = 16, 12


def tiny_clip(patch_dropout: float, seed: int = 0) -> MSClipModel:
    torch.manual_seed(seed)
    config = MSClipConfig.from_preset("clip-tiny", vision_config={**GRID_OVERRIDES, "patch_dropout": patch_dropout})
    return MSClipModel._from_config(config, attn_implementation="sdpa")


def images(batch: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_eval_mode_keeps_every_patch() -> None:
    model = tiny_clip(0.25).eval()
    reference = tiny_clip(0.0).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = model.get_image_features(pixel_values=images())
        expected = reference.get_image_features(pixel_values=images())
    assert got.last_hidden_state.shape[1] == 1 + NUM_PATCHES
    assert torch.equal(got.pooler_output, expected.pooler_output)


def test_training_keeps_the_class_token_and_a_random_subset_of_patches_per_image() -> None:
    model = tiny_clip(0.25).train()
    full = copy.deepcopy(model)
    full.config.vision_config.patch_dropout = 0.0
    pixels = images()
    with torch.no_grad():
        torch.manual_seed(5)
        dropped = model.get_image_features(pixel_values=pixels, output_hidden_states=True).hidden_states[0]
        every = full.get_image_features(pixel_values=pixels, output_hidden_states=True).hidden_states[0]
    assert every.shape[1] == 1 + NUM_PATCHES
    assert dropped.shape == (pixels.shape[0], 1 + KEPT, every.shape[-1])
    subsets = set()
    for image in range(pixels.shape[0]):
        # Which full-sequence token each kept token is (the LayerNorm before the encoder is per token).
        source = torch.cdist(dropped[image], every[image]).argmin(dim=1)
        assert_close_to_scale(dropped[image], every[image][source], 1e-5, f"kept tokens of image {image}")
        assert source[0] == 0
        assert (source[1:] > 0).all() and (source[1:].diff() > 0).all()  # distinct patches, in grid order
        subsets.add(tuple(source.tolist()))
    assert len(subsets) > 1  # each image draws its own patches

    with torch.no_grad():
        torch.manual_seed(5)
        again = model.get_image_features(pixel_values=pixels).pooler_output
        torch.manual_seed(6)
        other = model.get_image_features(pixel_values=pixels).pooler_output
        torch.manual_seed(5)
        replay = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.equal(again, replay)
    assert (again - other).abs().max() > 1e-4


def vision_training_flops(model: MSClipModel) -> int:
    model.train()
    with FlopCounterMode(display=False) as counter:
        model.get_image_features(pixel_values=images()).pooler_output.sum().backward()
    return counter.get_total_flops()


def test_patch_dropout_removes_vision_compute() -> None:
    half = vision_training_flops(tiny_clip(0.5))
    full = vision_training_flops(tiny_clip(0.0))
    # 1 + 8 tokens instead of 1 + 16 in every block: the GEMMs scale with the token count.
    assert half / full == pytest.approx(9 / 17, abs=0.03)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_out_of_range_values_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"patch_dropout must be in \[0, 1\)"):
        MSClipConfig.from_preset("clip-tiny", vision_config={"patch_dropout": value})


def test_the_parallel_branch_refuses_patch_dropout() -> None:
    with pytest.raises(ValueError, match="not available with the parallel branch"):
        MSClipConfig.from_preset("msclip-s-tiny", vision_config={"patch_dropout": 0.5})


def test_setting_survives_save_and_load(tmp_path) -> None:
    model = tiny_clip(0.25)
    model.save_pretrained(tmp_path)
    assert MSClipModel.from_pretrained(tmp_path).config.vision_config.patch_dropout == 0.25


def test_pretraining_option_sets_and_checks_patch_dropout() -> None:
    model = build_model(build_model_config(preset="clip-tiny", patch_dropout=0.5))
    assert model.config.vision_config.patch_dropout == 0.5
    with pytest.raises(ValueError, match="not available with the parallel branch"):
        build_model(build_model_config(preset="msclip-s-tiny", patch_dropout=0.5))
