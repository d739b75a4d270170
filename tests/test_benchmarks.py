"""The benchmark harness (`python -m benchmarks.run`) at its ``tiny`` size: every default section except
torch.compile runs (the data loader section j included), the JSON holds the ratio table, and the fairness checks the
docs rely on hold.

Timings at this size mean nothing, so nothing here asserts a speed; FLOP counts and the loss check are exact.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    # A subprocess: the harness sets torch to one thread for the whole process.
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--size", "tiny", "--repetitions", "1", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("bench") / "results.json"
    completed = run_bench("--quick", "--sections", "ahbcdeigj", "--output", str(output))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| ratio | value |" in completed.stdout
    return json.loads(output.read_text())


def rows(section: dict) -> dict[str, dict]:
    return {row["name"]: row for row in section["rows"]}


def test_every_requested_section_reports_rows_and_ratios(results: dict) -> None:
    assert list(results["sections"]) == list("ahbcdeigj")
    for key, section in results["sections"].items():
        assert section["rows"], key
        assert all(row["value"] > 0 for row in section["rows"]), key
    labels = {ratio["label"]: ratio for ratio in results["sections"]["a"]["ratios"]}
    assert labels["ours clip / HF, identical 77-padded input tensors"]["comment"] == "target >= 1.10"
    assert len(results["sections"]["h"]["ratios"]) == 2
    # The CPU clock's user/system split is recorded with every training row.
    for row in results["sections"]["h"]["rows"]:
        assert row["extra"]["user_ms"] > 0 and row["extra"]["system_ms"] >= 0


def test_training_contenders_compute_the_same_function_and_flops(results: dict) -> None:
    section = results["sections"]["a"]
    difference = next(float(m.group(1)) for note in section["notes"] if (m := re.search(r"= ([0-9.e+-]+)$", note)))
    assert difference < 1e-5
    flops = {name: row["extra"]["gflop_per_step"] for name, row in rows(section).items()}
    # Equal padding: the same FLOPs as CLIPModel; trimming CLIPModel's own 77-padded batch: the FLOPs of dynamic
    # padding, which equal CLIPModel's at pad-longest.
    assert flops["ours clip, pad 77, no trim (equal work)"] == flops["HF CLIPModel, pad 77 (processor default)"]
    assert (
        flops["ours clip, CLIPModel's own 77-padded batch (default: trims)"]
        == flops["ours clip, dynamic padding (default)"]
    )
    assert flops["ours clip, dynamic padding (default)"] == flops["HF CLIPModel, pad longest"]
    assert flops["ours clip, dynamic padding (default)"] < 0.75 * flops["HF CLIPModel, pad 77 (processor default)"]


def test_data_loader_section_has_a_row_and_a_ratio_per_worker_count(results: dict) -> None:
    section = results["sections"]["j"]
    loaders = [row for row in section["rows"] if row["name"].startswith("loader, ")]
    assert [row["extra"]["num_workers"] for row in loaders] == [0, 2, 4]
    assert all(row["unit"] == "pairs/s" and row["extra"]["cpu_ms_per_batch"] > 0 for row in loaders)
    (model,) = [row for row in section["rows"] if row not in loaders]
    assert model["name"].startswith("msclip-s-demo train step") and model["unit"] == "pairs/s"
    ratios = {ratio["label"]: ratio["value"] for ratio in section["ratios"]}
    for row in loaders:
        workers = row["extra"]["num_workers"]
        assert ratios[f"loader / model train step, {workers} workers"] == pytest.approx(row["value"] / model["value"])
    assert "batch 4" in section["title"]  # --size tiny keeps its batch; the default size uses the demo's 64
    assert any("CPU cores" in note for note in section["notes"])


def test_output_is_never_overwritten_without_the_flag(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    output.write_text("earlier results")
    completed = run_bench("--sections", "h", "--output", str(output))
    assert completed.returncode == 2
    assert "--overwrite" in completed.stderr
    assert output.read_text() == "earlier results"


def test_bfloat16_autocast_path_runs(tmp_path: Path) -> None:
    # The GPU runs use bf16 autocast; CPU autocast exercises the same dtype handling in the harness and the models.
    output = tmp_path / "bf16.json"
    completed = run_bench("--dtype", "bfloat16", "--sections", "ab", "--output", str(output))
    assert completed.returncode == 0, completed.stderr[-3000:]
    section = json.loads(output.read_text())["sections"]["a"]
    difference = next(float(m.group(1)) for note in section["notes"] if (m := re.search(r"= ([0-9.e+-]+)$", note)))
    assert difference < 0.02  # the same function, up to bf16 rounding (measured 3.9e-3)
