"""The demo's result table (``python -m training.demo --table-from``) and its model preset."""

import json
from pathlib import Path

import pytest

from training import demo


def _results() -> dict:
    def task(top1: float, classes: int, n: int, baseline: float | None = None) -> dict:
        return {"top1": top1, "chance": 1 / classes, "baseline": baseline, "num_samples": n}

    return {
        "zero_shot": {
            "shape": task(0.7, 5, 600),
            "color": task(1.0, 6, 600),
            "color_shape": task(0.6, 30, 600, 0.2),
            "color_shape_seen_pairs": task(0.8, 30, 291, 0.2),
            "color_shape_held_out_pairs": task(0.4, 30, 309, 0.2),
            "size": task(0.9, 2, 600),
        },
        "retrieval": {
            "image_to_text": {"recall@1": 0.1, "recall@5": 0.3, "chance@1": 1 / 600, "baseline@1": None},
            "text_to_image": {"recall@1": 0.05, "recall@5": 0.2, "chance@1": 1 / 600, "baseline@1": None},
        },
    }


def test_table_from_renders_chance_and_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    demo.main(["--table-from", str(path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| task (600 test images; n = images scored) | top-1 | chance | informed baseline |"
    assert len(lines) == 2 + 6 + 2  # header, separator, six zero-shot rows, two retrieval rows
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    held_out = next(line for name, line in rows.items() if "held-out pairs" in name)
    assert "**0.400** (12.0x chance) | 0.033 | 0.200 (right colour, random shape) |" in held_out
    assert "(n = 309)" in held_out
    assert rows["zero-shot shape (n = 600)"].endswith("| 0.700 (3.5x chance) | 0.200 | - |")
    assert rows["retrieval image→text R@1"].endswith("| 0.100 (60.0x chance) | 0.002 | - |")
    # README order: colour, size, shape, then colour+shape (all, held-out, seen), then retrieval.
    assert [name.split(" (n")[0] for name in rows][:3] == ["zero-shot colour", "zero-shot size", "zero-shot shape"]


def test_print_table_shows_baseline_column(capsys: pytest.CaptureFixture[str]) -> None:
    demo.print_table(_results())
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "top-1", "chance", "x", "chance", "baseline"]
    held_out = next(line for line in out.splitlines() if "held-out pairs" in line)
    assert held_out.split()[-1] == "0.200"
    assert next(line for line in out.splitlines() if line.startswith("zero-shot shape")).split()[-1] == "-"


def test_demo_preset_is_a_shared_msclip_s_model() -> None:
    from modeling_msclip import MSClipConfig

    config = MSClipConfig.from_preset(demo.DEFAULT_PRESET)
    vision = config.vision_config
    assert vision.embedding_type == "conv_stem"
    assert vision.image_size == demo.demo_shapes_config().image_size
    assert vision.grid_size >= 4  # the 2x2 grid of msclip-s-tiny cannot tell the shapes apart
    assert config.shared_block_positions == list(range(1, config.num_block_positions))
