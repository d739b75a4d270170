"""Scaling of MS-CLIP pre-training over ranks: per-rank memory tables, measured multi-process runs and a projection.

    python -m benchmarks.scaling                  # the memory tables of docs/scaling.md (nothing is run)
    python -m benchmarks.scaling --global_batch 65536 --world_sizes 8 64 512
    python -m benchmarks.scaling --measure --world_sizes 1 2 4 8 --stages ddp zero2 zero3 --global_batch 64
    python -m benchmarks.scaling --projection     # step time and efficiency on 8 nodes x 8 H100 (paper estimate)

Memory tables (the default):

1. Model states per rank under ZeRO stages 0-3, for mixed-precision AdamW (the ZeRO paper's accounting):
   bf16 parameters 2 bytes + bf16 gradients 2 bytes + optimizer state 12 bytes (fp32 master copy, first and second
   moment) per parameter. Stage 1 shards the optimizer state over the W ranks, stage 2 also the gradients, stage 3
   also the parameters. Parameter counts come from instantiating each preset on the meta device, so a parameter
   shared by both towers is counted once. Activations, temporary buffers and allocator fragmentation come on top.
2. Contrastive logits per rank for a global batch N over W ranks: the full N x N matrix (``local_loss=False``) or
   this rank's B = N / W image rows and B text rows against all N columns (``local_loss=True``).

``--measure`` launches real pre-training runs (training/run_pretrain.py through benchmarks/scaling_worker.py, under
``accelerate launch`` with configuration/accelerate/*.yaml, on 127.0.0.1) for every stage and world size at one
global batch, and prints the median step time, the time inside collectives and each run's largest per-rank peak
RSS, with ratios to W = 1 and to DDP (see docs/scaling.md for what the numbers mean on a CPU box).

``--projection`` estimates the step time of the real-size presets on a GPU cluster from their counted FLOPs and the
per-step communication volume of each stage; every assumption is an option (docs/scaling.md derives the formulas).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from modeling_msclip import MSClipConfig, MSClipModel

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("msclip-s-b32", "msclip-s-b16", "clip-b32")
BYTES_PARAMS, BYTES_GRADS, BYTES_OPTIMIZER = 2, 2, 12
GIB = 2**30
# Peak of the loss forward + backward over the analytic logits bytes, as measured by benchmarks.run section c:
# 4.1x for the full N x N logits (logits, one log-softmax per direction saved for backward, the gradient being
# formed) and 2.1x for the two local B x N matrices (the same four B x N matrices).
PEAK_OVER_LOGITS_FULL, PEAK_OVER_LOGITS_LOCAL = 4, 2


def parameter_counts(preset: str) -> tuple[int, int]:
    """(distinct parameters, parameters in modules shared by both towers) of ``preset``, built on the meta device."""
    with torch.device("meta"):
        model = MSClipModel(MSClipConfig.from_preset(preset))
    total = sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for name, p in model.named_parameters() if ".shared." in name)
    return total, shared


def zero_bytes_per_rank(num_params: int, stage: int, world_size: int) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state each rank holds under ZeRO ``stage``."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    params = BYTES_PARAMS * num_params / (world_size if stage >= 3 else 1)
    grads = BYTES_GRADS * num_params / (world_size if stage >= 2 else 1)
    optimizer = BYTES_OPTIMIZER * num_params / (world_size if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}


def logits_bytes_per_rank(global_batch: int, world_size: int, local_loss: bool, bytes_per_value: int = 4) -> int:
    """fp32 logits one rank materialises: N x N (full) or 2 x (N / W) x N (local rows)."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    if not local_loss:
        return bytes_per_value * global_batch * global_batch
    return 2 * bytes_per_value * (global_batch // world_size) * global_batch


def zero_table(world_sizes: list[int]) -> str:
    """Markdown table of the model-state bytes per rank of every preset, stage and world size."""
    lines = [
        "| preset | parameters | shared by both towers | W | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for preset in PRESETS:
        total, shared = parameter_counts(preset)
        for world_size in world_sizes:
            cells = [f"{zero_bytes_per_rank(total, stage, world_size)['total'] / GIB:.2f}" for stage in range(4)]
            lines.append(
                f"| {preset} | {total / 1e6:.1f} M | {shared / 1e6:.1f} M | {world_size} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def zero_breakdown_table(world_size: int) -> str:
    """Markdown table of params / grads / optimizer bytes per rank at ``world_size``, per preset and stage."""
    lines = [
        f"| preset | stage | params | grads | optimizer | total (GiB per rank, W = {world_size}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for preset in PRESETS:
        total, _ = parameter_counts(preset)
        for stage in range(4):
            parts = zero_bytes_per_rank(total, stage, world_size)
            lines.append(
                f"| {preset} | {stage} | "
                + " | ".join(f"{parts[key] / GIB:.3f}" for key in ("params", "grads", "optimizer", "total"))
                + " |"
            )
    return "\n".join(lines)


def logits_table(global_batch: int, world_sizes: list[int]) -> str:
    """Markdown table of the contrastive logits per rank (local and full loss) at ``global_batch``."""
    full = logits_bytes_per_rank(global_batch, 1, local_loss=False)
    lines = [
        "| W | local batch B | local logits 2·B·N (fp32) | ≈ loss peak, local | full N×N logits | ≈ loss peak, full |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for world_size in world_sizes:
        local = logits_bytes_per_rank(global_batch, world_size, local_loss=True)
        lines.append(
            f"| {world_size} | {global_batch // world_size} | {local / GIB:.3f} GiB | "
            f"{PEAK_OVER_LOGITS_LOCAL * local / GIB:.3f} GiB | {full / GIB:.2f} GiB | "
            f"{PEAK_OVER_LOGITS_FULL * full / GIB:.2f} GiB |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# --measure: real multi-process pre-training runs on this machine
# ------------------------------------------------------------------------------------------------------------------

STAGE_CONFIGS = {"ddp": "multi_process.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
STAGE_NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
MEASURE_COLUMNS = (
    "stage",
    "W",
    "batch per rank",
    "step s (median)",
    "step / W=1",
    "step / DDP",
    "collectives s/step",
    "collectives / step",
    "peak RSS GiB (max rank)",
    "RSS / W=1",
    "RSS / DDP",
    "RSS at train begin GiB",
    "elements per step / Ψ",
)


@dataclass
class MeasuredRun:
    """One launch of `measure`: the median step time over the timed steps of all ranks, the mean time per step
    inside collectives, the largest per-rank peak RSS (bytes), and rank 0's elements per step of each collective
    over the parameter count Ψ (an all-gather counted by its gathered size: W x this rank's share)."""

    stage: str
    world_size: int
    per_device_batch: int
    step_seconds: float
    collective_seconds: float
    max_rss_bytes: int
    max_rss_bytes_at_train_begin: int
    num_parameters: int = 0
    traffic_per_parameter: dict[str, float] = field(default_factory=dict)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the rendezvous of one launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_workspace(root: Path, num_train: int) -> tuple[Path, Path]:
    """A shapes dataset of ``num_train`` training pairs at 64 px and a BPE tokenizer trained on its captions (the
    steps of `make demo`, at benchmark size); returns (data folder, tokenizer folder)."""
    from modeling_msclip.data_msclip import iter_captions
    from modeling_msclip.tokenization_msclip import train_msclip_tokenizer
    from processing.shapes_dataset import ShapesConfig, write_shapes_dataset

    data = write_shapes_dataset(
        root / "shapes", num_train=num_train, num_validation=8, num_test=8, config=ShapesConfig(image_size=64)
    )
    tokenizer = root / "tokenizer"
    train_msclip_tokenizer(list(iter_captions(data, split="train")), 600).save_pretrained(str(tokenizer))
    return data, tokenizer


def launch_command(stage: str, world_size: int) -> list[str]:
    """``accelerate launch`` of one stage on ``world_size`` local processes. DDP at W = 1 is the plain one-process
    run (nothing to wrap); the DeepSpeed stages keep their engine at W = 1, so W = 1 shows its own overhead."""
    config = "single_process.yaml" if stage == "ddp" and world_size == 1 else STAGE_CONFIGS[stage]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configuration" / "accelerate" / config),
        "--num_processes", str(world_size),
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip


def run_one(
    stage: str,
    world_size: int,
    *,
    root: Path,
    data: Path,
    tokenizer: Path,
    preset: str,
    objective: str | None,
    global_batch: int,
    warmup_steps: int,
    steps: int,
    profile_steps: int,
    threads: int,
    timeout: float,
) -> MeasuredRun:
    """Launch one pre-training run and summarise its ranks' reports (raises with the log tail if it fails)."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by W = {world_size}")
    name = f"{stage}-w{world_size}"
    report_dir, log = root / name / "report", root / f"{name}.log"
    command = [
        *launch_command(stage, world_size),
        str(REPO / "benchmarks" / "scaling_worker.py"),
        "--report_dir", str(report_dir),
        "--profile_steps", str(profile_steps),
        "--",
        "--model_preset", preset,
        "--tokenizer_name_or_path", str(tokenizer),
        *(["--objective", objective] if objective else []),
        "--train_data", str(data), "--train_split", "train",
        "--per_device_train_batch_size", str(global_batch // world_size),
        "--max_steps", str(warmup_steps + steps + profile_steps),
        # Past the last step: no loss logging (and its all-reduce of the loss terms) inside a timed step.
        "--logging_steps", str(warmup_steps + steps + profile_steps + 1),
        "--learning_rate", "1e-4", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--no_augmentation",
        "--expected_world_size", str(world_size),
        "--output_dir", str(root / name / "output"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    # Output to a file, not a pipe: a rank blocked writing to a full pipe nobody reads would stall the collectives.
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{name} exited with {result.returncode}:\n{log.read_text()[-4000:]}")
    reports = [json.loads(path.read_text()) for path in sorted(report_dir.glob("rank*.json"))]
    if len(reports) != world_size or any(r["world_size"] != world_size for r in reports):
        raise RuntimeError(f"{name}: expected {world_size} rank reports of world size {world_size}, got {reports}")
    timed = [t for r in reports for t in r["step_seconds"][warmup_steps:]]
    if len(timed) != steps * world_size:
        raise RuntimeError(f"{name}: {len(timed)} timed steps over all ranks, expected {steps * world_size}")
    collectives = [r["collective_seconds_per_step"] or 0.0 for r in reports]
    num_parameters = reports[0]["num_parameters"]
    traffic = {
        op.split(":", 1)[1]: elements * (world_size if "gather" in op else 1) / num_parameters
        for op, elements in sorted(reports[0]["collective_elements_per_step"].items())
    }
    return MeasuredRun(
        stage=stage,
        world_size=world_size,
        per_device_batch=global_batch // world_size,
        step_seconds=statistics.median(timed),
        collective_seconds=statistics.mean(collectives),
        max_rss_bytes=max(r["max_rss_bytes"] for r in reports),
        max_rss_bytes_at_train_begin=max(r["max_rss_bytes_at_train_begin"] for r in reports),
        num_parameters=num_parameters,
        traffic_per_parameter=traffic,
    )


def measure(
    stages: list[str],
    world_sizes: list[int],
    *,
    preset: str = "msclip-s-tiny",
    objective: str | None = None,
    global_batch: int = 64,
    warmup_steps: int = 2,
    steps: int = 5,
    profile_steps: int = 2,
    threads: int = 1,
    timeout: float = 1200,
    workdir: Path | None = None,
) -> list[MeasuredRun]:
    """Run every (stage, world size) once, one launch at a time, on the same data; returns the runs in order.

    ``threads`` is OMP_NUM_THREADS of each rank. ``workdir`` keeps the data, each run's log (``<stage>-w<W>.log``)
    and its rank reports there instead of in a temporary folder. Runs are sequential so that they do not compete for
    the cores with each other (other load on the machine still shows up in the times)."""
    unknown = sorted(set(stages) - set(STAGE_CONFIGS))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {sorted(STAGE_CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="msclip_scaling_") if workdir is None else _kept(workdir) as folder:
        root = Path(folder)
        # Two global batches of pairs: the run goes over epochs, so the step count does not size the data.
        data, tokenizer = prepare_workspace(root, num_train=2 * global_batch)
        runs = []
        for stage in stages:
            for world_size in world_sizes:
                runs.append(
                    run_one(
                        stage,
                        world_size,
                        root=root,
                        data=data,
                        tokenizer=tokenizer,
                        preset=preset,
                        objective=objective,
                        global_batch=global_batch,
                        warmup_steps=warmup_steps,
                        steps=steps,
                        profile_steps=profile_steps,
                        threads=threads,
                        timeout=timeout,
                    )
                )
                print(f"[scaling] {runs[-1]}", file=sys.stderr, flush=True)
    return runs


@contextlib.contextmanager
def _kept(folder: Path):
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"--work_dir {folder} is not empty: the runs' data, logs and reports go there")
    folder.mkdir(parents=True, exist_ok=True)
    yield str(folder)


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference else "n/a"


def measurement_table(runs: list[MeasuredRun]) -> str:
    """Markdown table of `measure`'s runs with ratios to the same stage at W = 1 and to DDP at the same W (``n/a``
    where that run is not among ``runs``)."""
    by_key = {(run.stage, run.world_size): run for run in runs}
    lines = ["| " + " | ".join(MEASURE_COLUMNS) + " |", "|---|" + "---:|" * (len(MEASURE_COLUMNS) - 1)]
    for run in runs:
        single, ddp = by_key.get((run.stage, 1)), by_key.get(("ddp", run.world_size))
        cells = [
            STAGE_NAMES[run.stage],
            str(run.world_size),
            str(run.per_device_batch),
            f"{run.step_seconds:.3f}",
            _ratio(run.step_seconds, single.step_seconds if single else None),
            _ratio(run.step_seconds, ddp.step_seconds if ddp else None),
            f"{run.collective_seconds:.3f}",
            f"{run.collective_seconds / run.step_seconds:.2f}",
            f"{run.max_rss_bytes / GIB:.2f}",
            _ratio(run.max_rss_bytes, single.max_rss_bytes if single else None),
            _ratio(run.max_rss_bytes, ddp.max_rss_bytes if ddp else None),
            f"{run.max_rss_bytes_at_train_begin / GIB:.2f}",
            ", ".join(f"{name} {value:.2f}" for name, value in run.traffic_per_parameter.items()) or "none",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# --nclip_memory: where the per-rank memory of the nCLIP / xCLIP heads goes
# ------------------------------------------------------------------------------------------------------------------


def objective_parameter_counts(preset: str, objective: str) -> dict[str, int]:
    """Parameters of `MSClipForPreTraining` for ``preset`` with ``objective``, by part (built on the meta device):
    ``towers`` (the `MSClipModel`), ``head_mlps`` (both nCLIP MLPs), ``prototypes`` (counted once when shared),
    ``other`` (e.g. the SigLIP bias) and ``total``."""
    from modeling_msclip.modeling_msclip import MSClipForPreTraining

    config = MSClipConfig.from_preset(preset)
    config.objective = {"loss": objective}
    with torch.device("meta"):
        model = MSClipForPreTraining(config)
    counts = {"towers": 0, "head_mlps": 0, "prototypes": 0, "other": 0}
    for name, parameter in model.named_parameters():  # shared tensors are listed once
        part = (
            "towers"
            if name.startswith("msclip.")
            else "prototypes"
            if ".prototypes." in name
            else "head_mlps"
            if name.startswith(("image_head.", "text_head."))
            else "other"
        )
        counts[part] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def training_step_peak_rss(preset: str, objective: str, batch: int, steps: int = 2) -> dict[str, float]:
    """Peak RSS (bytes) of this process over ``steps`` fp32 AdamW training steps of ``preset`` with ``objective`` on
    random pairs of ``batch`` (captions of 16 tokens), one thread; plus the AdamW state bytes. Run it in a fresh
    process: the peak is a high-water mark of the whole process."""
    import resource

    from modeling_msclip.modeling_msclip import MSClipForPreTraining

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = MSClipConfig.from_preset(preset)
    config.objective = {"loss": objective}
    model = MSClipForPreTraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text, size = config.text_config, config.vision_config.image_size
    input_ids = torch.randint(1, text.eos_token_id, (batch, 16))
    input_ids[:, -1] = text.eos_token_id
    pixel_values = torch.randn(batch, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(steps):
        model(input_ids=input_ids, pixel_values=pixel_values).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    return {
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_training": before,
        "optimizer_state": state,
    }


def _peak_in_subprocess(preset: str, objective: str, batch: int) -> dict[str, float]:
    code = (
        "import json, benchmarks.scaling as s; "
        f"print(json.dumps(s.training_step_peak_rss({preset!r}, {objective!r}, {batch})))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise RuntimeError(f"the {objective} step at batch {batch} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def nclip_memory_table(preset: str, batches: list[int]) -> str:
    """Markdown tables: the nCLIP heads' parameters, their fp32 parameter/gradient/AdamW bytes and the prototype
    terms per rank (analytic), then the measured peak RSS of clip vs xclip training steps at each batch, each in a
    fresh process, and the per-pair slope of the difference."""
    settings = MSClipConfig.from_preset(preset).objective_config
    k, d = settings.nclip_num_prototypes, settings.nclip_bottleneck_dim
    clip, xclip = objective_parameter_counts(preset, "clip"), objective_parameter_counts(preset, "xclip")
    mib = 2**20
    heads = xclip["head_mlps"] + xclip["prototypes"]
    lines = [
        f"| {preset} | parameters | fp32 params MiB | grads MiB | AdamW m+v MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for part in ("towers", "head_mlps", "prototypes"):
        count = xclip[part]
        lines.append(f"| {part} | {count:,} | {4 * count / mib:.0f} | {4 * count / mib:.0f} | {8 * count / mib:.0f} |")
    lines += [
        f"| heads / towers | {heads / clip['towers']:.2f} x | | | |",
        "",
        f"Prototype matrix K x D = {k} x {d}: {4 * k * d / mib:.0f} MiB in fp32; one prototype score row "
        f"(K values) = {4 * k / 2**10:.0f} KiB per pair and modality.",
        "",
        "| batch | clip peak RSS MiB | xclip peak RSS MiB | xclip - clip MiB | AdamW state clip / xclip MiB |",
        "|---:|---:|---:|---:|---:|",
    ]
    differences = []
    for batch in batches:
        a, b = _peak_in_subprocess(preset, "clip", batch), _peak_in_subprocess(preset, "xclip", batch)
        differences.append((batch, (b["peak_rss"] - a["peak_rss"]) / mib))
        lines.append(
            f"| {batch} | {a['peak_rss'] / mib:.0f} | {b['peak_rss'] / mib:.0f} | {differences[-1][1]:.0f} | "
            f"{a['optimizer_state'] / mib:.0f} / {b['optimizer_state'] / mib:.0f} |"
        )
    if len(differences) >= 2:
        (b0, m0), (b1, m1) = differences[0], differences[-1]
        slope = (m1 - m0) / (b1 - b0)
        lines += [
            "",
            f"Slope of the difference: {slope:.2f} MiB per pair = {slope * mib / (4 * k):.1f} fp32 rows of K "
            f"prototype scores per pair; intercept (batch 0): {m0 - slope * b0:.0f} MiB.",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# --projection: step time on a GPU cluster, on paper
# ------------------------------------------------------------------------------------------------------------------

PROJECTION_STAGES = ("ddp", "zero2", "zero3", "zero3-twice", "zero3-resident")


@dataclass
class Cluster:
    """What the projection assumes about the machines (every field is a `--projection` option).

    Attributes:
        nodes, gpus_per_node: the cluster (W = nodes x gpus_per_node data-parallel ranks).
        peak_tflops: dense bf16 peak of one GPU (H100 SXM: 989 TFLOP/s without sparsity).
        mfu: fraction of the peak the encoders' forward and backward achieve.
        nvlink_gbytes: achieved bus bandwidth inside a node, GB/s per GPU (the nccl-tests "busbw" of a collective).
        internode_gbits: line rate of the node's InfiniBand links, Gb/s for the whole node.
        internode_efficiency: fraction of that line rate a collective achieves.
        hbm_gbytes: achieved HBM bandwidth, GB/s, for the memory-bound softmax of the contrastive loss.
        loss_passes: times the loss reads or writes a logits-sized fp32 tensor (forward and backward).
        ddp_grad_bytes: bytes per gradient element DDP all-reduces: 4 under autocast (fp32 parameters and
            gradients, what Trainer --bf16 does), 2 with a bf16 compression hook.
        zero_bytes: bytes per element of DeepSpeed's collectives (bf16 with "bf16": {"enabled": true}).
        feature_bytes: bytes per element of the all-gathered embeddings.
        text_tokens: caption length the FLOPs were counted at.
    """

    nodes: int = 8
    gpus_per_node: int = 8
    peak_tflops: float = 989.0
    mfu: float = 0.40
    nvlink_gbytes: float = 360.0
    internode_gbits: float = 400.0
    internode_efficiency: float = 0.8
    hbm_gbytes: float = 2400.0
    loss_passes: int = 8
    ddp_grad_bytes: int = 4
    zero_bytes: int = 2
    feature_bytes: int = 4
    text_tokens: int = 77

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


CLUSTER_HELP = {
    "nodes": "nodes",
    "gpus_per_node": "GPUs per node",
    "peak_tflops": "dense bf16 peak TFLOP/s of one GPU (H100 SXM: 989)",
    "mfu": "fraction of the peak the encoders achieve",
    "nvlink_gbytes": "achieved bus bandwidth inside a node, GB/s per GPU",
    "internode_gbits": "InfiniBand line rate of one node, Gb/s (all its links)",
    "internode_efficiency": "fraction of the line rate a collective achieves",
    "hbm_gbytes": "achieved HBM bandwidth, GB/s (the loss's softmax)",
    "loss_passes": "reads/writes of the fp32 logits per step",
    "ddp_grad_bytes": "bytes per gradient element of DDP's all-reduce (4: autocast, fp32 grads)",
    "zero_bytes": "bytes per element of DeepSpeed's collectives (2: bf16)",
    "feature_bytes": "bytes per element of the all-gathered embeddings",
    "text_tokens": "caption length of the FLOP count",
}


def collective_seconds(kind: str, size_bytes: float, cluster: Cluster) -> float:
    """Time of one hierarchical collective over the cluster on a tensor of ``size_bytes`` (the full tensor: the
    all-reduced gradient, the all-gathered parameters or features, the reduce-scattered gradient).

    All-reduce, as NCCL's ring/tree in two levels does it: a reduce-scatter inside each node over NVLink (each GPU
    sends (g-1)/g of the tensor), an all-reduce of each GPU's 1/g shard across the n nodes (each node sends
    2(n-1)/n of the tensor through its links in total) and an all-gather inside the node ((g-1)/g again):

        t_all_reduce = 2 (g-1)/g * S / B_nvlink + 2 (n-1)/n * S / B_node

    A reduce-scatter or an all-gather is one half of that: (g-1)/g * S / B_nvlink + (n-1)/n * S / B_node.
    """
    g, n = cluster.gpus_per_node, cluster.nodes
    nvlink = cluster.nvlink_gbytes * 1e9
    node = cluster.internode_gbits / 8 * 1e9 * cluster.internode_efficiency
    half = (g - 1) / g * size_bytes / nvlink + (n - 1) / n * size_bytes / node
    if kind == "all_reduce":
        return 2 * half
    if kind in ("all_gather", "reduce_scatter"):
        return half
    raise ValueError(f"unknown collective {kind!r}")


def model_state_traffic(stage: str, num_params: int, shared_params: int, cluster: Cluster) -> list[tuple[str, float]]:
    """The per-step collectives of the model states under ``stage``: (kind, bytes of the full tensor) each.

    * ddp: one all-reduce of the gradients (``ddp_grad_bytes`` per element).
    * zero2: an all-reduce of the gradients and, after the step, an all-gather of the updated parameters. DeepSpeed
      0.19's ZeRO-1/2 default ``use_multi_rank_bucket_allreduce: true`` all-reduces each gradient bucket and keeps
      this rank's slice (``false`` sends one ``reduce`` per owning rank instead, about a reduce-scatter's bytes);
      it reduces in ``communication_data_type``, bf16 under "bf16". 1.5 x the bytes of a bf16 DDP all-reduce.
    * zero3: the parameters are all-gathered in the forward and again in the backward, the gradients
      reduce-scattered (stage 3 calls ``reduce_scatter_tensor``): 1.5 x a DDP all-reduce at equal element size.
    * zero3-twice: as zero3, but the parameters of the modules both towers use are gathered at each of their two
      uses in the forward and in the backward (four all-gathers of them, a schedule that releases after every use).
    * zero3-resident: DeepSpeed's default once its trace is recorded: a parameter that is used again within
      ``stage3_max_reuse_distance`` elements (1e9) of the trace is not released, and a whole MS-CLIP-S step is
      shorter than that, so every parameter is gathered once per step (the bytes of one all-reduce, and all the
      parameters held during the step, as under ZeRO-2).
    """
    grads, params = cluster.zero_bytes * num_params, cluster.zero_bytes * num_params
    if stage == "ddp":
        return [("all_reduce", cluster.ddp_grad_bytes * num_params)]
    if stage == "zero2":
        return [("all_reduce", grads), ("all_gather", params)]
    if stage == "zero3-resident":
        return [("reduce_scatter", grads), ("all_gather", params)]
    if stage == "zero3":
        return [("reduce_scatter", grads), ("all_gather", params), ("all_gather", params)]
    if stage == "zero3-twice":
        shared = cluster.zero_bytes * shared_params
        return [("reduce_scatter", grads), ("all_gather", 2 * params + 2 * shared)]
    raise ValueError(f"unknown stage {stage!r}; choose from {PROJECTION_STAGES}")


def project_step(
    forward_flops_per_pair: float,
    num_params: int,
    shared_params: int,
    embed_dim: int,
    global_batch: int,
    stage: str,
    local_loss: bool,
    cluster: Cluster,
) -> dict[str, float]:
    """Projected seconds per optimizer step of one data-parallel configuration, and its scaling efficiency.

    Terms (seconds, per GPU; B = N / W pairs per GPU):

    * ``compute``: encoders' forward + backward = 3 x forward FLOPs x B / (mfu x peak);
    * ``loss``: the logits matmuls, 3 x (4 B N D) FLOPs with local loss (B image rows and B text rows against all N)
      or 3 x (2 N^2 D) for the full N x N matrix, at the same mfu, plus ``loss_passes`` reads/writes of the fp32
      logits at the HBM bandwidth (the softmax is memory-bound);
    * ``features``: the all-gather of the 2 N D image and text embeddings and the reduce-scatter of their gradients
      (gather_with_grad); on the critical path between the towers and the loss;
    * ``model_comm``: the model-state collectives of `model_state_traffic`.

    ``step_serial`` adds everything; ``step_overlap`` hides the model-state collectives behind the encoders' compute
    (DDP's bucketed all-reduce during the backward, ZeRO's prefetch) as far as they fit. The efficiency is the step
    time of one GPU with the same B pairs (the loss over B x B, no communication) over the projected step time: the
    weak-scaling efficiency of data parallelism.
    """
    world_size = cluster.world_size
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} GPUs")
    local_batch = global_batch // world_size
    flops_per_second = cluster.mfu * cluster.peak_tflops * 1e12
    hbm = cluster.hbm_gbytes * 1e9

    def loss_seconds(rows: int, columns: int, full: bool) -> float:
        flops = 3 * 2 * columns * columns * embed_dim if full else 3 * 4 * rows * columns * embed_dim
        logits = 4 * (columns * columns if full else 2 * rows * columns)
        return flops / flops_per_second + cluster.loss_passes * logits / hbm

    compute = 3 * forward_flops_per_pair * local_batch / flops_per_second
    loss = loss_seconds(local_batch, global_batch, full=not local_loss)
    feature_bytes = 2 * global_batch * embed_dim * cluster.feature_bytes
    features = collective_seconds("all_gather", feature_bytes, cluster)
    features += collective_seconds("reduce_scatter", feature_bytes, cluster)
    model_comm = sum(
        collective_seconds(kind, size, cluster)
        for kind, size in model_state_traffic(stage, num_params, shared_params, cluster)
    )
    single = compute + loss_seconds(local_batch, local_batch, full=False)
    serial = compute + loss + features + model_comm
    overlap = compute + loss + features + max(0.0, model_comm - compute)
    return {
        "local_batch": local_batch,
        "compute": compute,
        "loss": loss,
        "features": features,
        "model_comm": model_comm,
        "step_serial": serial,
        "step_overlap": overlap,
        "single_gpu_step": single,
        "efficiency_serial": single / serial,
        "efficiency_overlap": single / overlap,
        "pairs_per_second_overlap": global_batch / overlap,
    }


def forward_flops(preset: str, text_tokens: int = 77) -> dict[str, float]:
    """FLOPs of one forward of ``preset`` at batch 1 (one image, one caption of ``text_tokens`` tokens), counted by
    `torch.utils.flop_counter.FlopCounterMode` on CPU (a multiply-add is 2 FLOPs). Eager attention: the counter has
    no formula for CPU's fused SDPA kernel and would leave the attention matmuls out."""
    from torch.utils.flop_counter import FlopCounterMode

    config = MSClipConfig.from_preset(preset)
    config._attn_implementation = "eager"
    model = MSClipModel(config).eval()
    size = config.vision_config.image_size
    pixel_values = torch.zeros(1, 3, size, size)
    input_ids = torch.full((1, text_tokens), 1, dtype=torch.long)
    input_ids[0, -1] = config.text_config.eos_token_id
    counts = {}
    with torch.no_grad():
        for name, call in (
            ("image", lambda: model.get_image_features(pixel_values)),
            ("text", lambda: model.get_text_features(input_ids)),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            counts[name] = float(counter.get_total_flops())
    counts["pair"] = counts["image"] + counts["text"]
    return counts


def projection_table(
    presets: list[str], global_batch: int, cluster: Cluster, stages: tuple[str, ...] = PROJECTION_STAGES
) -> str:
    """Markdown tables: FLOPs per preset, then the projected step of every preset, stage and loss (`project_step`)."""
    flops_lines = [
        "| preset | parameters | shared | image fwd GFLOP | text fwd GFLOP | pair fwd+bwd GFLOP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines = [
        "| preset | stage | loss | B per GPU | compute ms | loss ms | features ms | model-state comm ms | "
        "step ms, serial | step ms, overlapped | efficiency serial | efficiency overlapped | pairs/s (overlapped) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for preset in presets:
        flops = forward_flops(preset, cluster.text_tokens)
        total, shared = parameter_counts(preset)
        embed_dim = MSClipConfig.from_preset(preset).projection_dim
        flops_lines.append(
            f"| {preset} | {total / 1e6:.1f} M | {shared / 1e6:.1f} M | {flops['image'] / 1e9:.2f} | "
            f"{flops['text'] / 1e9:.2f} | {3 * flops['pair'] / 1e9:.2f} |"
        )
        for stage in stages:
            for local_loss in (True, False):
                r = project_step(flops["pair"], total, shared, embed_dim, global_batch, stage, local_loss, cluster)
                lines.append(
                    f"| {preset} | {stage} | {'local' if local_loss else 'full'} | {r['local_batch']} | "
                    + " | ".join(
                        f"{1e3 * r[key]:.1f}"
                        for key in ("compute", "loss", "features", "model_comm", "step_serial", "step_overlap")
                    )
                    + f" | {r['efficiency_serial']:.2f} | {r['efficiency_overlap']:.2f} | "
                    f"{r['pairs_per_second_overlap']:,.0f} |"
                )
    return "\n".join(flops_lines) + "\n\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the memory tables, the ``--measure`` table or the ``--projection`` table."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name if __spec__ else 'benchmarks'}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--measure", action="store_true", help="launch real multi-process runs (see docs/scaling.md)")
    mode.add_argument("--projection", action="store_true", help="print the 64-GPU projection table")
    mode.add_argument(
        "--nclip_memory",
        "--nclip-memory",
        action="store_true",
        help="measure the per-rank memory of the nCLIP heads (xclip vs clip, one process)",
    )
    parser.add_argument(
        "--world_sizes",
        "--world-sizes",
        type=int,
        nargs="+",
        default=None,
        help="ranks: of the ZeRO table (default 8 64) or of --measure (default 1 2 4 8)",
    )
    parser.add_argument(
        "--global_batch",
        "--global-batch",
        type=int,
        default=None,
        help="global batch N: of the logits table and --projection (default 32768) or of --measure (default 64)",
    )
    parser.add_argument(
        "--logits_world_sizes",
        "--logits-world-sizes",
        type=int,
        nargs="+",
        default=[8, 32, 64, 128, 256, 512],
        help="ranks of the logits table",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the printed tables to this file")
    measuring = parser.add_argument_group("--measure")
    measuring.add_argument(
        "--stages", nargs="+", choices=sorted(STAGE_CONFIGS), default=["ddp", "zero2", "zero3"], help="what to run"
    )
    measuring.add_argument("--preset", default="msclip-s-tiny", help="model preset of the runs")
    measuring.add_argument("--objective", default=None, help="pre-training loss (default: the preset's, clip)")
    measuring.add_argument("--steps", type=int, default=5, help="timed steps per run (after the warm-up)")
    measuring.add_argument("--warmup_steps", "--warmup-steps", type=int, default=2, help="untimed first steps")
    measuring.add_argument(
        "--profile_steps", "--profile-steps", type=int, default=2, help="last steps, under the profiler"
    )
    measuring.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    measuring.add_argument("--timeout", type=float, default=1200, help="seconds one launch may take")
    measuring.add_argument("--work_dir", "--work-dir", type=Path, default=None, help="keep data and logs here")
    heads = parser.add_argument_group("--nclip_memory")
    heads.add_argument(
        "--nclip_batches", "--nclip-batches", type=int, nargs="+", default=[16, 64], help="batches of the steps"
    )
    projecting = parser.add_argument_group("--projection (the defaults are the assumptions of docs/scaling.md)")
    projecting.add_argument(
        "--projection_presets",
        "--projection-presets",
        nargs="+",
        default=["msclip-s-b32", "msclip-s-b16"],
        help="presets to project",
    )
    for assumption in fields(Cluster):
        flag = f"--{assumption.name}"
        aliases = [flag.replace("_", "-")] if "_" in assumption.name else []
        projecting.add_argument(
            flag,
            *aliases,
            type=type(assumption.default),
            default=assumption.default,
            help=CLUSTER_HELP[assumption.name],
        )
    args = parser.parse_args(argv)
    if args.nclip_memory:
        if min(args.nclip_batches) < 1:
            parser.error("--nclip_batches must be positive")
        report = "\n\n".join(
            [
                f"### nCLIP heads of {args.preset}: parameters, optimizer state and a training step's peak RSS",
                nclip_memory_table(args.preset, args.nclip_batches),
            ]
        )
        print(report)
        if args.output is not None:
            args.output.write_text(report + "\n")
        return report
    if args.projection:
        cluster = Cluster(**{f.name: getattr(args, f.name) for f in fields(Cluster)})
        if min(cluster.nodes, cluster.gpus_per_node, cluster.text_tokens) < 1 or not 0 < cluster.mfu <= 1:
            parser.error("--nodes, --gpus_per_node and --text_tokens must be positive and --mfu in (0, 1]")
        global_batch = args.global_batch or 32768
        if global_batch % cluster.world_size:
            parser.error(f"--global_batch {global_batch} is not divisible by {cluster.world_size} GPUs")
        settings = ", ".join(f"{key} {value}" for key, value in asdict(cluster).items())
        report = "\n\n".join(
            [
                f"### Projection: global batch {global_batch} on {cluster.nodes} x {cluster.gpus_per_node} GPUs "
                f"({settings})",
                projection_table(args.projection_presets, global_batch, cluster),
            ]
        )
        print(report)
        if args.output is not None:
            args.output.write_text(report + "\n")
        return report
    if args.measure:
        world_sizes = args.world_sizes or [1, 2, 4, 8]
        global_batch = args.global_batch or 64
    else:
        world_sizes = args.world_sizes or [8, 64]
        global_batch = args.global_batch or 32768
    if any(w < 1 for w in world_sizes + args.logits_world_sizes) or global_batch < 1:
        parser.error("world sizes and the global batch must be positive")
    if args.measure:
        if min(args.steps, args.profile_steps + 1, args.warmup_steps + 1) < 1:
            parser.error("--steps must be positive, --warmup_steps and --profile_steps not negative")
        if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
            parser.error(f"--work_dir {args.work_dir} is not empty")
        if bad := [w for w in world_sizes if global_batch % w]:
            parser.error(f"--global_batch {global_batch} is not divisible by the world sizes {bad}")
        runs = measure(
            args.stages,
            world_sizes,
            preset=args.preset,
            objective=args.objective,
            global_batch=global_batch,
            warmup_steps=args.warmup_steps,
            steps=args.steps,
            profile_steps=args.profile_steps,
            threads=args.threads,
            timeout=args.timeout,
            workdir=args.work_dir,
        )
        report = "\n\n".join(
            [
                f"### Measured: {args.preset}, objective {args.objective or 'clip'}, global batch {global_batch}, "
                f"{args.steps} timed steps after {args.warmup_steps}, collectives over {args.profile_steps}; "
                f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per rank",
                measurement_table(runs),
            ]
        )
    else:
        report = "\n\n".join(
            [
                "### Model states per rank (GiB): bf16 params + bf16 grads + fp32 AdamW state (master, m, v)",
                zero_table(world_sizes),
                f"### Breakdown at W = {world_sizes[-1]}",
                zero_breakdown_table(world_sizes[-1]),
                f"### Contrastive logits per rank, global batch N = {global_batch}",
                logits_table(global_batch, args.logits_world_sizes),
            ]
        )
    print(report)
    if args.output is not None:
        args.output.write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
