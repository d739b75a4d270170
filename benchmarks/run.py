"""Speed and memory of the MS-CLIP implementation against transformers' CLIPModel, in one process.

    python -m benchmarks.run                        # CPU, the "small" size, about 3-5 minutes on 2 cores
    python -m benchmarks.run --quick                # fewer/lighter sections, no torch.compile
    python -m benchmarks.run --output results.json  # also write every number as JSON
    python -m benchmarks.run --device cuda --dtype bfloat16 --size b32   # GPU: ViT-B/32 sizes, bf16 autocast, MFU
    python -m benchmarks.run --sections f --compile_extra   # torch.compile without graph breaks, recompile cost
    python -m benchmarks.run --sections ah                  # the CLIPModel comparisons only (about 2 minutes)

Sections (contenders inside a section are timed interleaved, median of --repetitions):

  a. training step (forward + backward + AdamW) pairs/s and peak memory: transformers CLIPModel vs our CLIP at
     identical sizes and weights (CLIPModel's own 77-padded batch, dynamic padding, and both at equal padding),
     MS-CLIP, MS-CLIP-S;
  h. the equal-FLOP comparisons of a (both pad 77 untrimmed, both pad longest), each pair raced on its own;
  b. inference latency of get_image_features / get_text_features at batch 1 and 64;
  c. contrastive loss memory, global N x N vs local B x N rows (analytic and measured);
  d. MS-CLIP-S text padding: 77 tokens without trimming vs dynamic padding / trimming;
  e. gradient checkpointing on vs off;
  i. patch dropout (FLIP) 0 / 0.5 / 0.75 of the image patches;
  g. gradient caching (k micro-batches) vs one full batch;
  j. the streamed data loader (ImageTextStream over webdataset shards) with 0 / 2 / 4 DataLoader workers against
     the msclip-s-demo training step, at the demo's image and batch size;
  f. torch.compile of the training step and of the loss (graph breaks, compile time, speed).

The table at the end is Markdown, ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_msclip import MSClipConfig, MSClipModel
from modeling_msclip.collators_msclip import ImageTextCollator
from modeling_msclip.gradcache_msclip import gradcache_backward, split_batch
from modeling_msclip.loss_msclip import ClipLoss
from modeling_msclip.pretraining_msclip import apply_patch_dropout
from modeling_msclip.streaming_msclip import STREAM_INFO_KEY

from .harness import CLOCKS, count_flops, interleaved_timings, machine_description, peak_memory_bytes, synchronizer
from .setups import (
    CONTEXT_LENGTH,
    END_ID,
    HF_PAD_ID,
    MSCLIP_PAD_ID,
    SIZES,
    START_ID,
    build_clip_pair,
    build_msclip,
    make_captions,
    make_images,
    parameter_count,
    without_padding_trim,
)

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU when --peak_tflops is not given.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
MB = 2**20


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured contender."""

    name: str
    value: float
    unit: str
    spread: float | None = None
    peak_mb: float | None = None
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class Section:
    """The rows, ratios and notes of one benchmark section."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    ratios: list[tuple[str, float, str]] = field(default_factory=list)  # (label, value, comment)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ratio(self, label: str, numerator: float, denominator: float, comment: str = "") -> float:
        value = numerator / denominator
        self.ratios.append((label, value, comment))
        return value

    def to_json(self) -> dict[str, object]:
        return {
            "title": self.title,
            "rows": [vars(row) for row in self.rows],
            "ratios": [{"label": label, "value": value, "comment": comment} for label, value, comment in self.ratios],
            "notes": self.notes,
            "seconds": self.seconds,
        }


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    size_name: str
    batch_size: int
    repetitions: int
    quick: bool
    peak_tflops: float | None
    profile: bool
    clock: str = "wall"
    compile_extra: bool = False
    compile_cache: str = "cold"
    batch_size_override: int | None = None  # --batch_size as given (section j uses the demo's batch without it)

    @property
    def size(self):
        return SIZES[self.size_name]

    @property
    def sync(self) -> Callable[[], None]:
        return synchronizer(self.device)

    @property
    def now(self) -> Callable[[], float]:
        return CLOCKS[self.clock]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in tensors.items()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Training-step races
# --------------------------------------------------------------------------------------------------------------------


def make_training_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], ctx: Context) -> Callable[[], None]:
    """One optimizer step of ``model`` on ``inputs``: forward with the model's own contrastive loss, backward, AdamW."""
    model.to(ctx.device).train()
    inputs = ctx.to_device(inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

    def step() -> None:
        with ctx.autocast():
            loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def race_training_steps(
    section: Section, steps: dict[str, Callable[[], None]], batch_size: int, ctx: Context, measure_flops: bool = True
) -> dict[str, Row]:
    """Time the steps interleaved, then measure each one's peak memory (and FLOPs) in one more step."""
    timings = interleaved_timings(steps, ctx.repetitions, warmup_calls=1, sync=ctx.sync, clock=ctx.clock)
    rows = {}
    for name, step in steps.items():
        timing = timings[name]
        row = Row(name, batch_size / timing.median, "pairs/s", timing.spread)
        row.extra["ms_per_step"] = round(1000 * timing.median, 1)
        if timing.user_seconds:
            row.extra["user_ms"] = round(1000 * statistics.median(timing.user_seconds), 1)
            row.extra["system_ms"] = round(1000 * statistics.median(timing.system_seconds), 1)
        peak = peak_memory_bytes(step, ctx.device)
        row.peak_mb = None if peak is None else peak / MB
        if measure_flops:
            flops = count_flops(step)
            row.extra["gflop_per_step"] = round(flops / 1e9, 2)
            row.extra["achieved_tflops"] = round(flops / timing.median / 1e12, 4)
            if ctx.peak_tflops:
                row.extra["mfu"] = round(flops / timing.median / (ctx.peak_tflops * 1e12), 4)
        section.rows.append(row)
        rows[name] = row
    return rows


def section_training(ctx: Context) -> Section:
    section = Section("a", f"Training step (forward + backward + AdamW), batch {ctx.batch_size}")
    size, batch = ctx.size, ctx.batch_size
    hf, ours = build_clip_pair(size)
    captions = make_captions(batch)
    images = make_images(batch, size.image_size)
    hf_77 = captions.padded(CONTEXT_LENGTH, HF_PAD_ID)
    hf_longest = captions.padded(None, HF_PAD_ID)
    ours_77 = captions.padded(CONTEXT_LENGTH, MSCLIP_PAD_ID)
    ours_longest = captions.padded(None, MSCLIP_PAD_ID)

    # Same function check: identical weights must give the same loss on the same pairs.
    check_images = images[:8].to(ctx.device)
    with torch.no_grad(), ctx.autocast():
        hf.to(ctx.device)
        ours.to(ctx.device)
        hf_loss = hf(
            **ctx.to_device({"input_ids": hf_77[0][:8], "attention_mask": hf_77[1][:8]}),
            pixel_values=check_images,
            return_loss=True,
        ).loss
        ours_loss = ours(
            **ctx.to_device({"input_ids": ours_77[0][:8], "attention_mask": ours_77[1][:8]}),
            pixel_values=check_images,
            return_loss=True,
        ).loss
    section.notes.append(
        f"our CLIP holds CLIPModel's converted weights ({parameter_count(ours) / 1e6:.2f} M parameters each); "
        f"|loss difference| on 8 of the benchmark pairs = {abs(hf_loss.item() - ours_loss.item()):.1e}"
    )
    section.notes.append(
        f"captions: {captions.lengths.min().item()}-{captions.lengths.max().item()} tokens (uniform 10..25, "
        f"mean {captions.lengths.float().mean().item():.1f}); dynamic padding = longest caption of the batch "
        f"({ours_longest[0].shape[1]} tokens)"
    )

    def pair(ids_mask: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": ids_mask[0], "attention_mask": ids_mask[1], "pixel_values": images}

    contenders = {
        "HF CLIPModel, pad 77 (processor default)": (hf, pair(hf_77)),
        "HF CLIPModel, pad longest": (copy.deepcopy(hf), pair(hf_longest)),
        "ours clip, pad 77, no trim (equal work)": (without_padding_trim(ours), pair(ours_77)),
        "ours clip, dynamic padding (default)": (ours, pair(ours_longest)),
        "ours clip, CLIPModel's own 77-padded batch (default: trims)": (copy.deepcopy(ours), pair(hf_77)),
        "ours msclip (attn+MLP shared)": (build_msclip(size, "msclip"), pair(ours_longest)),
        "ours msclip-s (stem+branch)": (build_msclip(size, "msclip-s"), pair(ours_longest)),
    }
    for name, (model, _) in contenders.items():
        log(f"  {name}: {parameter_count(model) / 1e6:.2f} M parameters")
    steps = {name: make_training_step(model, inputs, ctx) for name, (model, inputs) in contenders.items()}
    rows = race_training_steps(section, steps, batch, ctx)
    names = list(rows)
    value = {name: rows[name].value for name in names}
    section.ratio(
        "ours clip / HF, identical 77-padded input tensors", value[names[4]], value[names[0]], "target >= 1.10"
    )
    section.ratio("ours clip (dynamic) / HF (pad 77): as each is used", value[names[3]], value[names[0]])
    section.ratio(
        "ours clip / HF, both pad 77, no trim (same FLOPs)", value[names[2]], value[names[0]], "isolated: section h"
    )
    section.ratio("ours clip / HF, both pad longest (same FLOPs)", value[names[3]], value[names[1]])
    section.ratio("msclip / ours clip (dynamic)", value[names[5]], value[names[3]])
    section.ratio("msclip-s / ours clip (dynamic)", value[names[6]], value[names[3]])
    if ctx.profile:
        section.notes.extend(profile_steps({name: steps[name] for name in (names[0], names[2])}))
    return section


def profile_steps(steps: dict[str, Callable[[], None]], repetitions: int = 3, top: int = 16) -> list[str]:
    """Side-by-side self time per operator (``--profile``): ``repetitions`` profiled steps per contender, interleaved,
    averaged. Returns the table as one Markdown note."""
    from torch.profiler import ProfilerActivity, profile

    totals: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in steps}
    for _ in range(repetitions):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU, *_cuda_activity()]) as prof:
                step()
            for event in prof.key_averages():
                milliseconds, calls = totals[name].get(event.key, (0.0, 0.0))
                # GPU runs: the kernels' device time; CPU runs: the operators' own CPU time.
                self_us = event.self_device_time_total if torch.cuda.is_available() else event.self_cpu_time_total
                totals[name][event.key] = (
                    milliseconds + self_us / 1000 / repetitions,
                    calls + event.count / repetitions,
                )
    names = list(steps)
    operators = sorted(
        {key for table in totals.values() for key in table},
        key=lambda key: -max(totals[name].get(key, (0.0, 0.0))[0] for name in names),
    )
    header = "| operator | " + " | ".join(f"{name}: ms (calls)" for name in names) + " |"
    lines = [
        f"profile, self time per step, mean of {repetitions} steps each:",
        "",
        header,
        "|---|" + "---:|" * len(names),
    ]
    for key in operators[:top]:
        cells = [totals[name].get(key, (0.0, 0.0)) for name in names]
        lines.append(f"| {key[:60]} | " + " | ".join(f"{ms:.1f} ({calls:.0f})" for ms, calls in cells) + " |")
    totals_row = [sum(ms for ms, _ in totals[name].values()) for name in names]
    lines.append("| total (profiled) | " + " | ".join(f"{ms:.0f}" for ms in totals_row) + " |")
    return ["\n".join(lines)]


def _cuda_activity() -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CUDA] if torch.cuda.is_available() else []


# --------------------------------------------------------------------------------------------------------------------
# Inference latency
# --------------------------------------------------------------------------------------------------------------------


def section_inference(ctx: Context) -> Section:
    section = Section("b", "Inference latency (get_image_features / get_text_features, eval, inference_mode)")
    size = ctx.size
    hf, ours = build_clip_pair(size, seed=1)
    ours_no_trim = without_padding_trim(ours)
    for model in (hf, ours, ours_no_trim):
        model.to(ctx.device).eval()

    def call(fn: Callable[..., object], **inputs: torch.Tensor) -> Callable[[], None]:
        inputs = ctx.to_device(inputs)

        def run() -> None:
            with torch.inference_mode(), ctx.autocast():
                fn(**inputs)

        return run

    batches = (1, 64)
    for batch in batches:
        calls = 10 if batch == 1 else 1
        images = make_images(batch, size.image_size, seed=2)
        captions = make_captions(batch, seed=2)
        hf_ids, hf_mask = captions.padded(CONTEXT_LENGTH, HF_PAD_ID)
        ids, mask = captions.padded(CONTEXT_LENGTH, MSCLIP_PAD_ID)
        races = {
            f"image, batch {batch}": {
                "HF get_image_features": call(hf.get_image_features, pixel_values=images),
                "ours get_image_features": call(ours.get_image_features, pixel_values=images),
            },
            f"text, batch {batch}": {
                "HF get_text_features, pad 77": call(hf.get_text_features, input_ids=hf_ids, attention_mask=hf_mask),
                "ours get_text_features, same 77-padded input (trimmed)": call(
                    ours.get_text_features, input_ids=ids, attention_mask=mask
                ),
                "ours get_text_features, pad 77, no trim (equal work)": call(
                    ours_no_trim.get_text_features, input_ids=ids, attention_mask=mask
                ),
            },
        }
        for race, contenders in races.items():
            timings = interleaved_timings(
                contenders, ctx.repetitions, calls_per_repetition=calls, warmup_calls=2, sync=ctx.sync, clock=ctx.clock
            )
            names = list(contenders)
            for name in names:
                section.rows.append(Row(f"{race}: {name}", 1000 * timings[name].median, "ms", timings[name].spread))
            hf_ms = timings[names[0]].median
            section.ratio(f"{race}: HF / ours latency (>1 = ours faster)", hf_ms, timings[names[1]].median)
            if len(names) == 3:
                section.ratio(f"{race}: HF / ours, equal work", hf_ms, timings[names[2]].median)
        section.notes.append(
            f"batch {batch} captions: {captions.lengths.tolist() if batch == 1 else 'lengths 10..25'}; "
            "the trimmed contender runs up to the longest caption's end token"
        )
    return section


# --------------------------------------------------------------------------------------------------------------------
# Contrastive loss memory
# --------------------------------------------------------------------------------------------------------------------


def rank_local_clip_loss(
    all_image: torch.Tensor, all_text: torch.Tensor, logit_scale: torch.Tensor, rank: int, world_size: int
) -> torch.Tensor:
    """What rank ``rank`` computes in ``ClipLoss(local_loss=True)`` after the all-gather: B own rows vs N columns."""
    local = all_image.shape[0] // world_size
    rows = slice(rank * local, (rank + 1) * local)
    scale = logit_scale.exp()
    labels = torch.arange(local, device=all_image.device) + rank * local
    logits_per_image = scale * all_image[rows] @ all_text.T
    logits_per_text = scale * all_text[rows] @ all_image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def section_loss_memory(ctx: Context) -> Section:
    global_batch = 4096 if ctx.quick else 8192
    dim = 512
    section = Section("c", f"Contrastive loss forward + backward, global batch N = {global_batch}, dim {dim}, fp32")
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(global_batch, dim, generator=generator), dim=-1).to(ctx.device)
    text = F.normalize(image + 0.5 * torch.randn(global_batch, dim, generator=generator).to(ctx.device), dim=-1)
    logit_scale = torch.full((1,), 2.6592, device=ctx.device)

    # The simulation is the real thing: the rank losses average to the global loss.
    with torch.no_grad():
        check_batch, check_world = 512, 8
        expected = ClipLoss()(image[:check_batch], text[:check_batch], logit_scale)
        shares = [
            rank_local_clip_loss(image[:check_batch], text[:check_batch], logit_scale, r, check_world)
            for r in range(check_world)
        ]
        difference = abs(statistics.fmean(s.item() for s in shares) - expected.item())
    section.notes.append(f"check: mean of the {check_world} simulated rank losses - global loss = {difference:.1e}")

    def loss_call(world_size: int) -> Callable[[], None]:
        all_image = image.clone().requires_grad_(True)
        all_text = text.clone().requires_grad_(True)
        scale = logit_scale.clone().requires_grad_(True)

        def run() -> None:
            if world_size == 1:
                loss = ClipLoss()(all_image, all_text, scale)
            else:
                loss = rank_local_clip_loss(all_image, all_text, scale, 0, world_size)
            loss.backward()
            all_image.grad = all_text.grad = scale.grad = None

        return run

    for world_size in (1, 8, 64):
        rows = global_batch // world_size
        # Logits held per rank: one N x N matrix (the text logits are its transpose), or two B x N matrices.
        logits_bytes = 4 * global_batch * global_batch if world_size == 1 else 2 * 4 * rows * global_batch
        run = loss_call(world_size)
        run()  # warm-up
        start = ctx.now()
        run()
        ctx.sync()
        seconds = ctx.now() - start
        peak = peak_memory_bytes(run, ctx.device)
        name = "global N x N (1 rank)" if world_size == 1 else f"local {rows} x N (rank of {world_size})"
        row = Row(name, logits_bytes / MB, "MB logits (analytic)", peak_mb=None if peak is None else peak / MB)
        row.extra["seconds_one_call"] = round(seconds, 3)
        if peak is not None:
            row.extra["peak_over_logits"] = round(peak / logits_bytes, 2)
        section.rows.append(row)
    if section.rows[0].peak_mb and section.rows[1].peak_mb:
        section.ratio(
            "measured peak, global / local at W=8", section.rows[0].peak_mb, section.rows[1].peak_mb, "ideal 4"
        )
        section.ratio(
            "measured peak, global / local at W=64", section.rows[0].peak_mb, section.rows[2].peak_mb, "ideal 32"
        )
    section.notes.append(
        "analytic logits per rank: N^2 x 4 B (global; logits_per_text is a transposed view) vs 2 x (N/W) x N x 4 B "
        "(local); the measured peak adds the softmax saved for backward and the logits' gradient"
    )
    return section


# --------------------------------------------------------------------------------------------------------------------
# Issue 6: text padding in MS-CLIP-S
# --------------------------------------------------------------------------------------------------------------------


def section_padding(ctx: Context) -> Section:
    batch = ctx.batch_size
    section = Section("d", f"MS-CLIP-S (msclip-s-tiny preset) training step, batch {batch}: text padding")
    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-s-tiny")
    model = MSClipModel._from_config(config, attn_implementation="sdpa")
    captions = make_captions(batch, seed=3)
    images = make_images(batch, config.vision_config.image_size, seed=3)
    ids_77, mask_77 = captions.padded(CONTEXT_LENGTH, MSCLIP_PAD_ID)
    ids_longest, mask_longest = captions.padded(None, MSCLIP_PAD_ID)
    contenders = {
        "pad 77, trim_padding=False": (
            without_padding_trim(model),
            {"input_ids": ids_77, "attention_mask": mask_77, "pixel_values": images},
        ),
        "dynamic padding (pad longest)": (
            copy.deepcopy(model),
            {"input_ids": ids_longest, "attention_mask": mask_longest, "pixel_values": images},
        ),
        "pad 77, trimmed in the model (default)": (
            model,
            {"input_ids": ids_77, "attention_mask": mask_77, "pixel_values": images},
        ),
    }
    steps = {name: make_training_step(m, inputs, ctx) for name, (m, inputs) in contenders.items()}
    rows = race_training_steps(section, steps, batch, ctx, measure_flops=False)
    names = list(rows)
    section.ratio("dynamic / pad 77 untrimmed", rows[names[1]].value, rows[names[0]].value, "target >= 1.5")
    section.ratio("trimmed in model / pad 77 untrimmed", rows[names[2]].value, rows[names[0]].value, "target >= 1.5")
    section.notes.append(
        f"caption lengths uniform 10..25 tokens (this batch: longest {ids_longest.shape[1]}, "
        f"mean {captions.lengths.float().mean().item():.1f}); {parameter_count(model) / 1e6:.2f} M parameters"
    )
    return section


# --------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and gradient caching
# --------------------------------------------------------------------------------------------------------------------


def clip_inputs(ctx: Context, batch: int, seed: int = 4) -> dict[str, torch.Tensor]:
    ids, mask = make_captions(batch, seed=seed).padded(None, MSCLIP_PAD_ID)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": make_images(batch, ctx.size.image_size, seed)}


def section_checkpointing(ctx: Context) -> Section:
    section = Section("e", f"Gradient checkpointing, ours clip, batch {ctx.batch_size}, dynamic padding")
    _, ours = build_clip_pair(ctx.size)
    checkpointed = copy.deepcopy(ours)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inputs = clip_inputs(ctx, ctx.batch_size)
    steps = {
        "checkpointing off": make_training_step(ours, inputs, ctx),
        "checkpointing on (every block)": make_training_step(checkpointed, inputs, ctx),
    }
    rows = race_training_steps(section, steps, ctx.batch_size, ctx, measure_flops=False)
    off, on = rows["checkpointing off"], rows["checkpointing on (every block)"]
    section.ratio("speed, on / off", on.value, off.value)
    if off.peak_mb and on.peak_mb:
        section.ratio("peak memory, on / off", on.peak_mb, off.peak_mb)
    return section


def section_patch_dropout(ctx: Context) -> Section:
    section = Section("i", f"Patch dropout (FLIP), ours clip, batch {ctx.batch_size}, dynamic padding")
    _, ours = build_clip_pair(ctx.size)
    inputs = clip_inputs(ctx, ctx.batch_size)
    steps = {}
    for fraction in (0.0, 0.5, 0.75):
        model = copy.deepcopy(ours)
        apply_patch_dropout(model.config, fraction)
        steps[f"patch_dropout {fraction}"] = make_training_step(model, inputs, ctx)
    rows = list(race_training_steps(section, steps, ctx.batch_size, ctx).values())
    num_patches = ctx.size.grid_size**2
    section.notes.append(f"{num_patches} patches per image; the text tower and the loss are unchanged")
    for row in rows[1:]:
        section.ratio(f"speed, {row.name} / none", row.value, rows[0].value)
    return section


def section_gradcache(ctx: Context) -> Section:
    batch = ctx.batch_size
    section = Section("g", f"Gradient caching, ours clip, accumulated batch {batch} (all pairs contrasted)")
    _, ours = build_clip_pair(ctx.size)
    inputs = ctx.to_device(clip_inputs(ctx, batch, seed=5))
    loss_fn = ClipLoss()

    def gradcache_step(model: MSClipModel, num_micro_batches: int) -> Callable[[], None]:
        model.to(ctx.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        micro_batches = split_batch(inputs, num_micro_batches)

        def step() -> None:
            with ctx.autocast():
                if num_micro_batches == 1:
                    output = model(**inputs)
                    loss_fn(output.image_embeds, output.text_embeds, output.logit_scale).backward()
                else:
                    gradcache_backward(model, micro_batches, loss_fn)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps = {
        f"one batch of {batch}": gradcache_step(ours, 1),
        f"gradcache, 2 x {batch // 2}": gradcache_step(copy.deepcopy(ours), 2),
        f"gradcache, 4 x {batch // 4}": gradcache_step(copy.deepcopy(ours), 4),
    }
    rows = list(race_training_steps(section, steps, batch, ctx, measure_flops=False).values())
    for row in rows[1:]:
        section.ratio(f"speed, {row.name} / one batch", row.value, rows[0].value, "expected ~0.75 (one extra forward)")
        if row.peak_mb and rows[0].peak_mb:
            section.ratio(f"peak memory, {row.name} / one batch", row.peak_mb, rows[0].peak_mb)
    return section


# --------------------------------------------------------------------------------------------------------------------
# Streamed data loader against the training step (section j)
# --------------------------------------------------------------------------------------------------------------------

LOADER_WORKERS = (0, 2, 4)
LOADER_BATCHES_PER_WORKER = 4  # at the most workers: one warm-up round and three timed ones
LOADER_SHARDS = 8  # at least one shard per worker, so that no worker reads another's shards
MADE_AT_KEY = "bench_made_at"


class StampingCollator(ImageTextCollator):
    """The real collator, which also stamps each batch with the time it was made at in its worker (``time.time``:
    one clock for all processes)."""

    def collate_decoded(self, pixel_values: Sequence[torch.Tensor], captions: Sequence[str]) -> dict[str, object]:
        batch = super().collate_decoded(pixel_values, captions)
        batch[MADE_AT_KEY] = time.time()
        return batch


def _write_demo_shards(folder: Path, num_records: int, image_size: int, num_shards: int) -> list[str]:
    """``num_records`` scenes of the demo's shapes data (PNG at ``image_size``, as the demo stores them) as webdataset
    shards in ``folder``; returns their captions."""
    import io

    from modeling_msclip.webdataset_msclip import WebDatasetShardWriter
    from processing.shapes_dataset import generate_examples
    from training.demo import demo_shapes_config

    captions = []
    with WebDatasetShardWriter(folder, samples_per_shard=-(-num_records // num_shards)) as writer:
        for image, metadata in generate_examples("train", num_records, demo_shapes_config(image_size)):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            writer.write(buffer.getvalue(), "png", metadata["text"])
            captions.append(metadata["text"])
    return captions


def _time_loader_pass(stream: object, num_workers: int, epoch: int) -> tuple[float | None, float, float, dict | None]:
    """One epoch of ``stream`` (built with a `StampingCollator`) read as `MSClipTrainer.get_train_dataloader` reads it.

    Returns the steady pairs/s (``None`` when the pass had no steady window), the seconds to the first batch, the CPU
    seconds of the pass over the main process and the workers, and the last batch.

    Steady pairs/s: the batches made while every worker had made its first batch (start-up, shuffle-buffer fill) and
    none had made its last, per second of that window, from the times the batches were made in the workers. Arrival
    times would overstate it: a worker that started early has its next batches prefetched by the time the last
    worker's first batch arrives, and they arrive in a burst.
    """
    stream.set_epoch(epoch)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_start, start = time.process_time(), time.perf_counter()
    first_arrival, batch, made = None, None, {}
    with warnings.catch_warnings():
        # More workers than cores is what the W=4 row measures; the section's note says so once.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        for batch in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers):
            first_arrival = first_arrival or time.perf_counter()
            made.setdefault(batch[STREAM_INFO_KEY]["position"][1], []).append(batch[MADE_AT_KEY])
    # The workers have exited, and been waited for, once the epoch is exhausted: RUSAGE_CHILDREN holds their time.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu_start + (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    window_start = max(times[0] for times in made.values())
    window_end = min(times[-1] for times in made.values())
    in_window = sum(window_start < when <= window_end for times in made.values() for when in times)
    rate = in_window * stream.batch_size / (window_end - window_start) if in_window else None
    return rate, first_arrival - start, cpu, batch


def section_data_loader(ctx: Context) -> Section:
    """Can the streamed loader feed the demo's training step? Pairs/s of `ImageTextStream` read through a
    `DataLoader` with 0 / 2 / 4 workers (shards of the demo's PNG shapes data, decode + random resized crop +
    tokenisation) against the train pairs/s of ``msclip-s-demo`` on batches already in memory."""
    from modeling_msclip import MSClipConfig, MSClipForPreTraining, MSClipImageProcessor, train_msclip_tokenizer
    from modeling_msclip.pretraining_msclip import align_text_config_with_tokenizer
    from modeling_msclip.streaming_msclip import ImageTextStream, webdataset_source
    from modeling_msclip.transforms_msclip import TrainImageTransform
    from training.demo import parse_arguments

    demo = parse_arguments([])  # the demo's defaults: preset, image size, batch size, crop scale, vocabulary
    batch = ctx.batch_size_override or (ctx.batch_size if ctx.size_name == "tiny" else demo.batch_size)
    section = Section(
        "j",
        f"Streamed data loader vs training step ({demo.preset}, {demo.image_size} px, batch {batch}): pairs/s",
    )
    num_records = max(LOADER_WORKERS) * LOADER_BATCHES_PER_WORKER * batch
    with tempfile.TemporaryDirectory(prefix="msclip_bench_shards_") as folder:
        captions = _write_demo_shards(Path(folder), num_records, demo.image_size, LOADER_SHARDS)
        tokenizer = train_msclip_tokenizer(captions, demo.vocab_size)
        image_processor = MSClipImageProcessor.from_preset("msclip", image_size=demo.image_size)
        collator = StampingCollator(
            tokenizer, TrainImageTransform.from_image_processor(image_processor, scale=(demo.crop_scale_min, 1.0))
        )
        source = webdataset_source(folder)
        streams = {
            workers: ImageTextStream([source], collator, batch_size=batch, num_workers=workers, num_samples=num_records)
            for workers in LOADER_WORKERS
        }
        measured: dict[int, list[tuple[float, float, float]]] = {workers: [] for workers in LOADER_WORKERS}
        last_batch = None
        for repetition in range(ctx.repetitions):  # interleaved and rotated, like the other sections' contenders
            shift = repetition % len(LOADER_WORKERS)
            for workers in LOADER_WORKERS[shift:] + LOADER_WORKERS[:shift]:
                rate, first_batch, cpu, last_batch = _time_loader_pass(streams[workers], workers, repetition)
                measured[workers].append((rate, first_batch, cpu))
    loader_rows = {}
    for workers in LOADER_WORKERS:
        rates = [rate for rate, _, _ in measured[workers] if rate is not None]
        if not rates:
            raise RuntimeError(f"no pass with {workers} workers had a steady window: give each worker more batches")
        median = statistics.median(rates)
        name = f"loader, {workers} workers" + (" (in the main process)" if workers == 0 else "")
        row = Row(name, median, "pairs/s", (max(rates) - min(rates)) / median)
        row.extra["num_workers"] = workers
        if len(rates) < len(measured[workers]):
            row.extra["passes_without_steady_window"] = len(measured[workers]) - len(rates)
        row.extra["ms_per_batch"] = round(1000 * batch / median, 1)
        row.extra["first_batch_s"] = round(statistics.median(first for _, first, _ in measured[workers]), 2)
        row.extra["cpu_ms_per_batch"] = round(
            1000 * statistics.median(cpu for _, _, cpu in measured[workers]) / (num_records // batch), 1
        )
        section.rows.append(row)
        loader_rows[workers] = row

    torch.manual_seed(0)
    config = MSClipConfig.from_preset(demo.preset)
    align_text_config_with_tokenizer(config, tokenizer, resize=True)
    model = MSClipForPreTraining._from_config(config, attn_implementation="sdpa")
    inputs = {
        key: value for key, value in last_batch.items() if key not in (STREAM_INFO_KEY, MADE_AT_KEY, "return_loss")
    }
    name = f"{demo.preset} train step (forward + backward + AdamW), batches in memory"
    model_row = race_training_steps(section, {name: make_training_step(model, inputs, ctx)}, batch, ctx)[name]
    for workers, row in loader_rows.items():
        comment = ">1: the loader keeps up"
        if workers == 0:
            comment += "; not overlapped with the step, a run gets 1 / (1/loader + 1/model)"
        section.ratio(f"loader / model train step, {workers} workers", row.value, model_row.value, comment)

    shares = ", ".join(
        f"W={workers} {row.extra['cpu_ms_per_batch'] / model_row.extra['ms_per_step']:.2f}"
        for workers, row in loader_rows.items()
    )
    section.notes.append(
        f"CPU the loader needs per second of training step (cpu_ms_per_batch / ms_per_step): {shares}; "
        "on a machine whose cores all train, that is the share of them the workers take away"
    )
    cores = os.cpu_count() or 1
    oversubscribed = [workers for workers in LOADER_WORKERS if workers > cores]
    section.notes.append(
        f"{num_records} records in {LOADER_SHARDS} webdataset shards of the demo's shapes data ({demo.image_size} px "
        f"PNG, {len(tokenizer)}-token BPE trained on their captions); each pass is one epoch of "
        "ImageTextStream([source], ImageTextCollator(tokenizer, TrainImageTransform(crop scale "
        f"{demo.crop_scale_min}..1)), batch_size={batch}, num_workers=W) read through DataLoader(stream, "
        "batch_size=None, num_workers=W), as MSClipTrainer.get_train_dataloader reads it; "
        f"median of {ctx.repetitions} pass{'es' if ctx.repetitions > 1 else ''} per W, interleaved"
    )
    section.notes.append(
        "loader pairs/s: wall clock, the batches made (stamped in the worker) after every worker's first batch "
        "(the warm-up: worker start, shuffle-buffer fill, first decode; skipped) and before any worker's last one, per "
        "second of that window; at W=0 from the first batch to the last. first_batch_s: seconds to the first batch; "
        "cpu_ms_per_batch: CPU time of the main process and the workers over the whole pass, per batch. "
        f"The loader runs alone: in training its workers share the cores with the model step. Model row: "
        f"{'process CPU time' if ctx.clock == 'cpu' else 'wall clock'}, {torch.get_num_threads()} torch thread(s), "
        f"{parameter_count(model) / 1e6:.2f} M parameters, the unfused AdamW of the other sections"
    )
    section.notes.append(
        f"this machine has {cores} CPU cores"
        + (
            f": W = {', '.join(map(str, oversubscribed))} oversubscribes them (more worker processes than cores; "
            "DataLoader warns, the warning is silenced here)"
            if oversubscribed
            else ""
        )
    )
    return section


# --------------------------------------------------------------------------------------------------------------------
# Equal work in isolated pairs (section h)
# --------------------------------------------------------------------------------------------------------------------


def section_equal_work_pairs(ctx: Context) -> Section:
    """Our CLIP against `CLIPModel` at identical FLOPs, each pair raced on its own.

    In section a eight contenders share the process, and `CLIPModel` at 77 tokens has the largest step memory of
    them, so it pays most of the page faults that come from the heap changing size between contenders. Racing
    two contenders alone keeps the heap at their own size and measures the implementation difference only.
    """
    section = Section("h", f"Equal work, raced in isolated pairs, batch {ctx.batch_size}")
    hf, ours = build_clip_pair(ctx.size)
    captions, images = make_captions(ctx.batch_size), make_images(ctx.batch_size, ctx.size.image_size)
    for label, length in (("pad 77", CONTEXT_LENGTH), ("pad longest", None)):
        hf_ids, hf_mask = captions.padded(length, HF_PAD_ID)
        ids, mask = captions.padded(length, MSCLIP_PAD_ID)
        steps = {
            f"HF CLIPModel, {label}": make_training_step(
                copy.deepcopy(hf), {"input_ids": hf_ids, "attention_mask": hf_mask, "pixel_values": images}, ctx
            ),
            f"ours clip, {label}, no trim": make_training_step(
                without_padding_trim(ours),
                {"input_ids": ids, "attention_mask": mask, "pixel_values": images},
                ctx,
            ),
        }
        hf_row, ours_row = race_training_steps(section, steps, ctx.batch_size, ctx, measure_flops=False).values()
        section.ratio(f"ours clip / HF, {label} (same FLOPs, isolated pair)", ours_row.value, hf_row.value)
        gc.collect()
    return section


# --------------------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------------------


def _error_summary(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line[:300]}"


def section_compile(ctx: Context) -> Section:
    if ctx.compile_cache != "cold":
        return _section_compile(ctx)
    # A fresh inductor cache, so that the reported compile time is what a first run pays (a warm on-disk cache
    # from an earlier run cuts it several-fold).
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="msclip_bench_inductor_") as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        try:
            return _section_compile(ctx)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def _section_compile(ctx: Context) -> Section:
    section = Section("f", f"torch.compile (inductor) of ours clip training step, batch {ctx.batch_size}")
    section.notes.append(f"inductor cache: {ctx.compile_cache}")
    _, ours = build_clip_pair(ctx.size)
    inputs = ctx.to_device(clip_inputs(ctx, ctx.batch_size))
    ours.to(ctx.device).train()

    # Graph breaks, without compiling (dynamo only).
    try:
        explanation = torch._dynamo.explain(ours)(**inputs, return_loss=True)
        reasons = sorted({_first_line(reason.reason) for reason in explanation.break_reasons})
        section.notes.append(
            f"model forward: {explanation.graph_count} graphs, {explanation.graph_break_count} graph breaks; "
            f"reasons: {reasons}"
        )
        image, text = F.normalize(torch.randn(2, 64, 32), dim=-1).to(ctx.device)
        loss_explanation = torch._dynamo.explain(ClipLoss())(image, text, torch.zeros(1, device=ctx.device))
        section.notes.append(
            f"ClipLoss forward: {loss_explanation.graph_count} graph(s), {loss_explanation.graph_break_count} breaks"
        )
    except Exception as error:  # report whatever dynamo raises, do not hide it
        section.notes.append(f"torch._dynamo.explain failed: {_error_summary(error)}")
    torch._dynamo.reset()

    eager_model = copy.deepcopy(ours)
    eager_step = make_training_step(eager_model, inputs, ctx)
    with torch.no_grad(), ctx.autocast():
        eager_loss = eager_model(**inputs, return_loss=True).loss
    variants = {"torch.compile": copy.deepcopy(ours)}
    if ctx.compile_extra:
        # The graph breaks all come from trimming (a data-dependent length); inputs padded to the longest caption
        # need no trimming, so this variant shows what the model compiles to without them.
        variants["torch.compile, trim_padding=False (no graph break)"] = without_padding_trim(ours)
    steps: dict[str, Callable[[], None]] = {"eager": eager_step}
    compiled_models = {}
    for name, model in variants.items():
        compiled_model = torch.compile(model)
        start = time.perf_counter()
        try:
            with ctx.autocast():
                compiled_loss = compiled_model(**inputs, return_loss=True).loss
            compiled_loss.backward()
            ctx.sync()
        except Exception as error:  # a compile failure is a result to report
            section.notes.append(f"{name} of the training step FAILED: {_error_summary(error)}")
            log(traceback.format_exc())
            continue
        section.notes.append(
            f"{name}: first forward + backward (compilation included, wall clock) {time.perf_counter() - start:.1f} s; "
            f"|compiled - eager loss| = {abs(eager_loss - compiled_loss).item():.1e}"
        )
        compiled_model.zero_grad(set_to_none=True)
        steps[name] = make_training_step(compiled_model, inputs, ctx)
        compiled_models[name] = compiled_model
    if len(steps) == 1:
        return section

    rows = race_training_steps(section, steps, ctx.batch_size, ctx, measure_flops=False)
    for name in compiled_models:
        section.ratio(f"speed, {name} / eager", rows[name].value, rows["eager"].value)

    if ctx.compile_extra and "torch.compile" in compiled_models:
        # Dynamic padding changes the text length from batch to batch: what does a new length cost?
        longer = clip_inputs(ctx, ctx.batch_size, seed=6)
        length = longer["input_ids"].shape[1] + 4
        longer["input_ids"] = F.pad(longer["input_ids"], (0, 4), value=MSCLIP_PAD_ID)
        longer["attention_mask"] = F.pad(longer["attention_mask"], (0, 4), value=0)
        body = torch.randint(1, START_ID, (length - 2,), generator=torch.Generator().manual_seed(6))
        longer["input_ids"][0] = torch.cat([torch.tensor([START_ID]), body, torch.tensor([END_ID])])
        longer["attention_mask"][0] = 1
        new_length_step = make_training_step(compiled_models["torch.compile"], ctx.to_device(longer), ctx)
        start = time.perf_counter()
        new_length_step()
        ctx.sync()
        section.notes.append(
            f"torch.compile: first step with a {length}-token longest caption instead of "
            f"{inputs['input_ids'].shape[1]} (recompiles with dynamic shapes, wall clock): "
            f"{time.perf_counter() - start:.1f} s"
        )
    return section


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0][:160]


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def _format_number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render_markdown(machine: dict[str, object], sections: list[Section], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    lines += ["| machine | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in machine.items()]
    for section in sections:
        lines += ["", f"### {section.key}. {section.title}  ({section.seconds:.0f} s)", ""]
        lines += ["| contender | value | unit | spread | peak MB | details |", "|---|---:|---|---:|---:|---|"]
        for row in section.rows:
            spread = "" if row.spread is None else f"{100 * row.spread:.0f}%"
            peak = "" if row.peak_mb is None else f"{row.peak_mb:.0f}"
            details = ", ".join(f"{key} {value}" for key, value in row.extra.items())
            lines.append(f"| {row.name} | {_format_number(row.value)} | {row.unit} | {spread} | {peak} | {details} |")
        if section.ratios:
            lines += ["", "| ratio | value | |", "|---|---:|---|"]
            lines += [f"| {label} | {value:.2f}x | {comment} |" for label, value, comment in section.ratios]
        for note in section.notes:
            lines += ["", f"- {note}" if "\n" not in note else note]
    return "\n".join(lines)


SECTIONS: dict[str, Callable[[Context], Section]] = {
    "a": section_training,
    "h": section_equal_work_pairs,
    "b": section_inference,
    "c": section_loss_memory,
    "d": section_padding,
    "e": section_checkpointing,
    "i": section_patch_dropout,
    "g": section_gradcache,
    "j": section_data_loader,
    "f": section_compile,
}
DEFAULT_SECTIONS = "ahbcdeigjf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name if __spec__ else 'benchmarks'}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    parser.add_argument("--size", default="small", choices=sorted(SIZES), help="model/batch sizes (see setups.SIZES)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=None, help="override the size's batch size")
    parser.add_argument("--repetitions", type=int, default=5, help="timed repetitions per contender (median)")
    parser.add_argument(
        "--sections",
        default=DEFAULT_SECTIONS,
        help=f"sections to run, from {''.join(SECTIONS)} (default {DEFAULT_SECTIONS})",
    )
    parser.add_argument("--quick", action="store_true", help="smaller loss simulation, skip torch.compile")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; default 1 on CPU (multi-threaded timings on a shared machine swing several-fold "
        "whenever a neighbour runs), torch's default on GPU",
    )
    parser.add_argument(
        "--peak_tflops", "--peak-tflops", type=float, default=None, help="accelerator peak for MFU (auto for GPUs)"
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables for section a")
    parser.add_argument(
        "--compile_cache",
        "--compile-cache",
        choices=["cold", "warm"],
        default="cold",
        help="section f: compile with a fresh inductor cache (cold, default) or the user's on-disk cache (warm)",
    )
    parser.add_argument(
        "--compile_extra",
        "--compile-extra",
        action="store_true",
        help="section f: also compile without padding trimming (no graph breaks) and time a step at a new text "
        "length (a dynamic-shape recompile); adds about two minutes on CPU",
    )
    parser.add_argument("--output", type=Path, default=None, help="write all numbers as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="allow --output to replace an existing file")
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {''.join(SECTIONS)}")
    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    if args.output is not None and args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    return args


def main(argv: list[str] | None = None) -> list[Section]:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but torch.cuda.is_available() is False")
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda" and args.dtype != "float32":
        name = torch.cuda.get_device_name(device)
        peak_tflops = next((value for key, value in GPU_PEAK_TFLOPS.items() if key in name), None)
    ctx = Context(
        device=device,
        dtype=getattr(torch, args.dtype),
        size_name=args.size,
        batch_size=args.batch_size or SIZES[args.size].batch_size,
        repetitions=args.repetitions,
        quick=args.quick,
        peak_tflops=peak_tflops,
        profile=args.profile,
        compile_extra=args.compile_extra,
        compile_cache=args.compile_cache,
        batch_size_override=args.batch_size,
        # One compute thread on CPU: time the work (process CPU time), not the neighbours (see harness).
        clock="cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall",
    )
    machine = machine_description(device)
    machine["size"] = f"{args.size}: {SIZES[args.size].describe()}".replace(
        f"batch {SIZES[args.size].batch_size}", f"batch {ctx.batch_size}"
    )
    machine["dtype"] = args.dtype
    machine["clock"] = "process CPU time (1 thread)" if ctx.clock == "cpu" else "wall clock"
    machine["repetitions"] = args.repetitions
    for key, value in machine.items():
        log(f"{key}: {value}")
    run_start = time.perf_counter()
    sections = []
    for key in SECTIONS:
        if key not in args.sections or (key == "f" and args.quick):
            continue
        log(f"[{key}] running ...")
        start = time.perf_counter()
        section = SECTIONS[key](ctx)
        section.seconds = time.perf_counter() - start
        log(f"[{key}] done in {section.seconds:.0f} s")
        sections.append(section)
    if hasattr(os, "getloadavg"):
        machine["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    machine["total_seconds"] = round(time.perf_counter() - run_start)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    print(render_markdown(machine, sections, command.strip()))
    if args.output is not None:
        payload = {"machine": machine, "command": command, "sections": {s.key: s.to_json() for s in sections}}
        args.output.write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {args.output}")
    return sections


if __name__ == "__main__":
    main()
