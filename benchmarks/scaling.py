"""Per-rank training memory at scale, computed from the packaged presets (nothing is run on an accelerator).

    python -m benchmarks.scaling                  # the tables of docs/scaling.md
    python -m benchmarks.scaling --global_batch 65536 --world_sizes 8 64 512

1. Model states per rank under ZeRO stages 0-3, for mixed-precision AdamW (the ZeRO paper's accounting):
   bf16 parameters 2 bytes + bf16 gradients 2 bytes + optimizer state 12 bytes (fp32 master copy, first and second
   moment) per parameter. Stage 1 shards the optimizer state over the W ranks, stage 2 also the gradients, stage 3
   also the parameters. Parameter counts come from instantiating each preset on the meta device, so a parameter
   shared by both towers is counted once. Activations, temporary buffers and allocator fragmentation come on top.
2. Contrastive logits per rank for a global batch N over W ranks: the full N x N matrix (``local_loss=False``) or
   this rank's B = N / W image rows and B text rows against all N columns (``local_loss=True``).
"""

from __future__ import annotations

import argparse

import torch

from modeling_msclip import MSClipConfig, MSClipModel

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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name if __spec__ else 'benchmarks'}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--world_sizes", "--world-sizes", type=int, nargs="+", default=[8, 64], help="ranks for the ZeRO table"
    )
    parser.add_argument(
        "--global_batch", "--global-batch", type=int, default=32768, help="global batch N for the logits table"
    )
    parser.add_argument(
        "--logits_world_sizes",
        "--logits-world-sizes",
        type=int,
        nargs="+",
        default=[8, 32, 64, 128, 256, 512],
        help="ranks, logits table",
    )
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.world_sizes + args.logits_world_sizes) or args.global_batch < 1:
        parser.error("world sizes and the global batch must be positive")
    report = "\n\n".join(
        [
            "### Model states per rank (GiB): bf16 params + bf16 grads + fp32 AdamW state (master, m, v)",
            zero_table(args.world_sizes),
            f"### Breakdown at W = {args.world_sizes[-1]}",
            zero_breakdown_table(args.world_sizes[-1]),
            f"### Contrastive logits per rank, global batch N = {args.global_batch}",
            logits_table(args.global_batch, args.logits_world_sizes),
        ]
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
