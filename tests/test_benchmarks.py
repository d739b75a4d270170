"""The benchmark harness (`python -m benchmarks.run`) at its ``tiny`` size: every default section except
torch.compile runs (the data loader section j included), the JSON holds the ratio table, and the fairness checks the
docs rely on hold.

Timings at this size mean nothing, so nothing here asserts a speed; FLOP counts and the loss check are exact.
"""

import json
import math
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


# ---------------------------------------------------------------------------------------------- benchmarks.scaling


def test_projection_matches_a_hand_computed_case() -> None:
    from benchmarks.scaling import Cluster, collective_seconds, project_step

    # 2 nodes x 2 GPUs; 50 TFLOP/s achieved; NVLink 100 GB/s; 80 Gb/s = 10 GB/s per node; HBM 1 TB/s.
    cluster = Cluster(
        nodes=2,
        gpus_per_node=2,
        peak_tflops=100.0,
        mfu=0.5,
        nvlink_gbytes=100.0,
        internode_gbits=80.0,
        internode_efficiency=1.0,
        hbm_gbytes=1000.0,
        loss_passes=2,
        ddp_grad_bytes=4,
        zero_bytes=2,
        feature_bytes=4,
    )
    # One half-collective of S bytes: (1/2) S / 1e11 + (1/2) S / 1e10 = 5.5e-11 S seconds.
    assert collective_seconds("all_gather", 1e9, cluster) == pytest.approx(0.055)
    assert collective_seconds("all_reduce", 1e9, cluster) == pytest.approx(0.110)
    assert collective_seconds("all_reduce", 1e9, Cluster(nodes=1, gpus_per_node=2, nvlink_gbytes=100.0)) == (
        pytest.approx(0.010)  # one node: NVLink only, 2 x (1/2) x 1e9 / 1e11
    )
    # 1 GFLOP per pair forward, 1e8 parameters (half shared), D = 100, N = 400 over W = 4: B = 100.
    step = project_step(1e9, 100_000_000, 50_000_000, 100, 400, "ddp", True, cluster)
    compute = 3 * 1e9 * 100 / 50e12  # 6 ms
    loss = 12 * 100 * 400 * 100 / 50e12 + 2 * (4 * 2 * 100 * 400) / 1e12  # 0.96 us + 0.64 us
    features = 2 * 5.5e-11 * (2 * 400 * 100 * 4)  # all-gather + reduce-scatter of 320 kB
    ddp = 2 * 5.5e-11 * 4e8  # all-reduce of 1e8 fp32 gradients: 44 ms
    single = compute + 12 * 100 * 100 * 100 / 50e12 + 2 * (4 * 2 * 100 * 100) / 1e12
    assert step["local_batch"] == 100
    assert step["compute"] == pytest.approx(compute)
    assert step["loss"] == pytest.approx(loss)
    assert step["features"] == pytest.approx(features)
    assert step["model_comm"] == pytest.approx(ddp)
    assert step["step_serial"] == pytest.approx(compute + loss + features + ddp)
    assert step["step_overlap"] == pytest.approx(compute + loss + features + ddp - compute)
    assert step["efficiency_serial"] == pytest.approx(single / (compute + loss + features + ddp))
    assert step["pairs_per_second_overlap"] == pytest.approx(400 / (loss + features + ddp))
    # bf16 (2e8 bytes): ZeRO-2 all-reduce + all-gather (22 + 11 ms); ZeRO-3 reduce-scatter + two all-gathers
    # (33 ms); gathering the shared half at both uses in the forward and the backward: all-gathers of 2e8 + 2 x 2e8 +
    # 2 x 1e8 bytes (44 ms); resident: reduce-scatter + one all-gather (22 ms).
    comm = {s: project_step(1e9, 100_000_000, 50_000_000, 100, 400, s, True, cluster)["model_comm"] for s in
            ("zero2", "zero3", "zero3-twice", "zero3-resident")}  # fmt: skip
    assert comm == pytest.approx({"zero2": 0.033, "zero3": 0.033, "zero3-twice": 0.044, "zero3-resident": 0.022})
    # The full loss: 3 x 2 N^2 D FLOPs and 2 passes over the 4 N^2 bytes of the N x N logits.
    full = project_step(1e9, 100_000_000, 50_000_000, 100, 400, "ddp", False, cluster)
    assert full["loss"] == pytest.approx(6 * 400 * 400 * 100 / 50e12 + 2 * 4 * 400 * 400 / 1e12)
    with pytest.raises(ValueError, match="not divisible"):
        project_step(1e9, 1, 0, 100, 401, "ddp", True, cluster)


def test_nclip_head_parameter_counts_follow_the_objective_settings() -> None:
    from benchmarks.scaling import objective_parameter_counts
    from modeling_msclip import MSClipConfig

    config = MSClipConfig.from_preset("msclip-s-tiny")
    settings = config.objective_config
    d_in, hidden, bottleneck = config.projection_dim, settings.nclip_hidden_dim, settings.nclip_bottleneck_dim
    mlp = d_in * hidden + hidden + hidden * hidden + hidden + hidden * bottleneck + bottleneck  # 3 layers, biases
    clip, xclip = (
        objective_parameter_counts("msclip-s-tiny", "clip"),
        objective_parameter_counts("msclip-s-tiny", "xclip"),
    )
    assert settings.nclip_head_layers == 3 and settings.nclip_share_prototypes
    assert clip == {"towers": xclip["towers"], "head_mlps": 0, "prototypes": 0, "other": 0, "total": xclip["towers"]}
    assert xclip["head_mlps"] == 2 * mlp == 9_708_032
    assert xclip["prototypes"] == settings.nclip_num_prototypes * bottleneck == 16_777_216  # one shared matrix
    assert xclip["total"] == xclip["towers"] + 2 * mlp + 65536 * 256


@pytest.mark.slow
def test_scaling_measurement_table_is_complete(tmp_path: Path) -> None:
    """Real launches (DDP and ZeRO-3, one and two gloo ranks): every row and column is filled with finite numbers,
    the ratios of the W = 1 and DDP rows are 1, and the two-rank runs went through collectives. No timing is
    asserted: on a shared 2-core machine the times mean little."""
    output = tmp_path / "measure.md"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--measure", "--world_sizes", "1", "2", "--stages", "ddp",
         "zero3", "--steps", "1", "--warmup_steps", "1", "--profile_steps", "1", "--output", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    table = [line for line in output.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in table[2:]]
    assert [(row["stage"], row["W"]) for row in rows] == [("DDP", "1"), ("DDP", "2"), ("ZeRO-3", "1"), ("ZeRO-3", "2")]
    numeric = [c for c in header if c not in ("stage", "elements per step / Ψ")]
    for row in rows:
        values = {column: float(row[column]) for column in numeric}
        assert all(math.isfinite(v) and v >= 0 for v in values.values()), row
        assert values["step s (median)"] > 0 and values["peak RSS GiB (max rank)"] > 0
        assert values["batch per rank"] * values["W"] == 64
        if row["W"] == "1":
            assert values["step / W=1"] == values["RSS / W=1"] == 1.0
        if row["stage"] == "DDP":
            assert values["step / DDP"] == values["RSS / DDP"] == 1.0
    for row in rows[1::2]:  # W = 2: the gradients (about one parameter count per step) went through collectives
        assert float(row["collectives s/step"]) > 0
        traffic = dict(item.rsplit(" ", 1) for item in row["elements per step / Ψ"].split(", "))
        assert sum(float(value) for value in traffic.values()) >= 1.0, row
