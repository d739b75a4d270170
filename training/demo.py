"""The main job of ``make demo``: pre-train a small MS-CLIP-S on the embedded shapes data, then evaluate it.

1. draws the embedded dataset (procedural shapes with compositional captions; no download) into
   ``demo_output/data/shapes`` (reused on later runs drawn with the same settings);
2. trains a small BPE tokenizer on the training captions and saves it into the run folder (nothing is read from
   outside the repository);
3. pre-trains ``msclip-s-demo`` (MS-CLIP-S: conv stem, text block 0 text-only, attention and MLP shared in the other
   blocks; 6 blocks of width 128 and a 4x4 token grid at 64 px) on CPU with
   ``accelerate launch training/run_pretrain.py``, evaluating zero-shot accuracy on held-out colour/shape
   combinations while it trains;
4. evaluates zero-shot classification (shape, colour, size, colour+shape; all test images, the held-out
   combinations never seen in training and the seen ones) and image<->text retrieval, prints a table against chance
   and an informed baseline, and writes ``results.json`` and ``curves.png`` into a new
   ``demo_output/runs/<timestamp>/`` folder.

Usage: ``python -m training.demo [--steps N] [--batch_size B] [--output demo_output] ...`` (``--help`` shows the
defaults), and ``python -m training.demo --table_from demo_output/runs/<timestamp>/results.json`` to print the
markdown table of a finished run without training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = "msclip-s-demo"

# Caption mix of the demo's data (the dataset's defaults stay as they are for the tests). Size and position are
# named in only some captions: when every caption names them, a batch can be told apart without looking at shapes.
# Half of the object phrases leave out the colour ("a large circle"): those pairs can only be matched by shape, and
# without them contrastive training learns colour and leaves shape at chance (docs/data.md has the measurements).
DEMO_SHAPES_SETTINGS: dict[str, Any] = {
    "image_size": 64,
    "size_drop_probability": 0.7,
    "position_drop_probability": 0.7,
    "color_drop_probability": 0.5,
}
SPLIT_SIZES = {"validation": 200, "test": 600}

# Informed baselines of the zero-shot tasks: what a model that knows colour but guesses the shape scores on
# colour+shape (right colour, random shape among the five). The other tasks are compared with chance only.
NUM_SHAPES = 5
COLOR_ONLY_BASELINE = {"color_shape": 1 / NUM_SHAPES}

# Table rows in this order (tasks not listed follow).
TASK_NAMES = {
    "color": "zero-shot colour",
    "size": "zero-shot size",
    "shape": "zero-shot shape",
    "color_shape": "zero-shot colour+shape, all test images",
    "color_shape_held_out_pairs": "zero-shot colour+shape, **held-out pairs never seen in training**",
    "color_shape_seen_pairs": "zero-shot colour+shape, seen pairs",
}


def demo_shapes_config(image_size: int = 64) -> Any:
    """The `ShapesConfig` the demo draws its data with (``DEMO_SHAPES_SETTINGS`` at ``image_size``)."""
    from processing.shapes_dataset import ShapesConfig

    return ShapesConfig(**{**DEMO_SHAPES_SETTINGS, "image_size": image_size})


def prepare_data(folder: Path, num_train: int, config: Any) -> Path:
    """Draw the shapes dataset into ``folder``, or reuse the one there when it was drawn with the same settings."""
    from processing.shapes_dataset import load_shapes_info, write_shapes_dataset

    splits = {"train": num_train, **SPLIT_SIZES}
    if (folder / "shapes_info.json").is_file():
        info = load_shapes_info(folder)
        # Reused only if drawn with exactly these settings (compared as shapes_info.json stores them).
        if info.get("splits") == splits and info.get("config") == json.loads(json.dumps(asdict(config))):
            print(f"[demo] reusing the shapes dataset in {folder}")
            return folder
    print(f"[demo] drawing {num_train} training scenes into {folder}")
    write_shapes_dataset(
        folder,
        num_train=splits["train"],
        num_validation=splits["validation"],
        num_test=splits["test"],
        config=config,
        overwrite=folder.exists(),
    )
    return folder


def train_tokenizer(data: Path, output: Path, vocab_size: int) -> Path:
    """Train a BPE tokenizer on the training captions of ``data`` and save it into ``output``."""
    from modeling_msclip.data_msclip import iter_captions
    from modeling_msclip.tokenization_msclip import train_msclip_tokenizer

    captions = list(iter_captions(data, split="train"))
    tokenizer = train_msclip_tokenizer(captions, vocab_size)
    tokenizer.save_pretrained(str(output))
    print(f"[demo] tokenizer with {len(tokenizer)} tokens trained on {len(captions)} captions: {output}")
    return output


def write_task_files(run_dir: Path, task_name: str) -> tuple[Path, Path, str]:
    """Class-name and template files of a zero-shot task, for run_pretrain's zero-shot evaluation."""
    from processing.shapes_dataset import ZERO_SHOT_TASKS

    task = ZERO_SHOT_TASKS[task_name]
    classes, templates = run_dir / f"{task_name}_classes.txt", run_dir / f"{task_name}_templates.txt"
    classes.write_text("\n".join(task.class_names) + "\n")
    templates.write_text("\n".join(task.templates) + "\n")
    return classes, templates, task.label_column


def pretrain(run_dir: Path, data: Path, tokenizer: Path, args: argparse.Namespace) -> Path:
    """Run ``training/run_pretrain.py`` under ``accelerate launch`` (one CPU process); returns the model folder."""
    classes, templates, label_column = write_task_files(run_dir, "color_shape")
    heldout = run_dir / "heldout_test"
    _save_heldout_split(data, heldout)
    model_dir = run_dir / "model"
    preset = ["--model_config", args.preset] if args.preset.endswith(".json") else ["--model_preset", args.preset]
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    augmentation = (
        ["--no_augmentation"] if args.crop_scale_min >= 1.0 else ["--crop_scale_min", str(args.crop_scale_min)]
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configuration" / "accelerate" / "single_process.yaml"),
        str(REPO / "training" / "run_pretrain.py"),
        *preset,
        "--tokenizer_name_or_path",
        str(tokenizer),
        "--train_data",
        str(data),
        "--train_split",
        "train",
        "--output_dir",
        str(model_dir),
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--max_steps",
        str(args.steps),
        "--learning_rate",
        str(args.learning_rate),
        "--learning_rate_shared",
        str(args.learning_rate),
        "--weight_decay",
        "0.1",
        "--warmup_steps",
        str(warmup),
        "--lr_scheduler_type",
        "cosine",
        *augmentation,
        "--logging_steps",
        "10",
        "--save_strategy",
        "no",
        "--dataloader_num_workers",
        "2",
        "--seed",
        str(args.seed),
        "--zeroshot_eval_data",
        str(heldout),
        "--zeroshot_label_column",
        label_column,
        "--zeroshot_class_names",
        str(classes),
        "--zeroshot_templates",
        str(templates),
        "--zeroshot_eval_steps",
        str(max(1, args.steps // 5)),
    ]
    print("[demo] " + " ".join(command))
    subprocess.run(command, check=True, cwd=REPO)
    return model_dir


def _save_heldout_split(data: Path, output: Path) -> None:
    """The test images whose colour+shape pair never occurs in training, saved with `save_to_disk`."""
    from modeling_msclip.data_msclip import load_image_text_dataset

    test = load_image_text_dataset(data, split="test")
    test.filter(lambda row: bool(row["held_out_pair"])).save_to_disk(str(output))


def evaluate(model_dir: Path, data: Path) -> dict[str, Any]:
    """Zero-shot accuracy of every shapes task and retrieval on the test split, with chance levels and informed
    baselines (``None`` where a task is compared with chance only)."""
    from modeling_msclip import MSClipModel, MSClipProcessor
    from processing.shapes_dataset import evaluate_shapes_dataset

    model = MSClipModel.from_pretrained(model_dir).eval()
    processor = MSClipProcessor.from_pretrained(model_dir)
    raw = evaluate_shapes_dataset(model, processor, data, split="test")
    results: dict[str, Any] = {"zero_shot": {}, "retrieval": {}}
    for key, metrics in raw.items():
        if key.startswith("zeroshot_"):
            name = key.removeprefix("zeroshot_")
            task = "color_shape" if name.startswith("color_shape") else name
            results["zero_shot"][name] = {
                "top1": metrics["top1"],
                "chance": 1.0 / metrics["num_classes"],
                "baseline": COLOR_ONLY_BASELINE.get(task),
                "num_samples": metrics["num_samples"],
            }
    retrieval = raw["retrieval"]
    for direction in ("image_to_text", "text_to_image"):
        results["retrieval"][direction] = {
            "recall@1": retrieval[f"{direction}_recall@1"],
            "recall@5": retrieval[f"{direction}_recall@5"],
            "chance@1": 1.0 / retrieval["num_texts" if direction == "image_to_text" else "num_images"],
            "baseline@1": None,
        }
    return results


def table_rows(results: dict[str, Any]) -> list[tuple[str, float, float, float | None, int | None]]:
    """``(task, score, chance, informed baseline or None, number of samples or None)`` for every result."""
    rows: list[tuple[str, float, float, float | None, int | None]] = []
    order = [name for name in TASK_NAMES if name in results["zero_shot"]]
    order += [name for name in results["zero_shot"] if name not in TASK_NAMES]
    for name in order:
        metrics = results["zero_shot"][name]
        label = TASK_NAMES.get(name, "zero-shot " + name)
        rows.append((label, metrics["top1"], metrics["chance"], metrics.get("baseline"), metrics.get("num_samples")))
    for name, metrics in results["retrieval"].items():
        label = f"retrieval {name.replace('_to_', '→')} R@1"
        rows.append((label, metrics["recall@1"], metrics["chance@1"], metrics.get("baseline@1"), None))
    return rows


def print_table(results: dict[str, Any]) -> None:
    """The results as a plain-text table: score, chance, informed baseline, and the score over each of them."""
    rows = [(name.replace("**", ""), *rest) for name, *rest in table_rows(results)]
    width = max(len(row[0]) for row in rows)
    print(f"\n{'task':<{width}}  {'top-1':>6}  {'chance':>6}  {'x chance':>8}  {'baseline':>8}")
    for name, value, chance, baseline, _ in rows:
        base = f"{baseline:8.3f}" if baseline is not None else f"{'-':>8}"
        print(f"{name:<{width}}  {value:6.3f}  {chance:6.3f}  {value / chance:8.1f}  {base}")
    print("(baseline: right colour with a random shape, 1/5, for colour+shape; '-': compared with chance only)")


def markdown_table(results: dict[str, Any]) -> str:
    """The README table of a run: one row per task with top-1, chance and the informed baseline."""
    lines = [
        "| task (600 test images; n = images scored) | top-1 | chance | informed baseline |",
        "|---|---|---|---|",
    ]
    for name, value, chance, baseline, num_samples in table_rows(results):
        label = f"{name} (n = {num_samples})" if num_samples is not None else name
        score = f"**{value:.3f}**" if "**" in name else f"{value:.3f}"
        base = f"{baseline:.3f} (right colour, random shape)" if baseline is not None else "-"
        lines.append(f"| {label} | {score} ({value / chance:.1f}x chance) | {chance:.3f} | {base} |")
    return "\n".join(lines)


def plot_curves(model_dir: Path, results: dict[str, Any], path: Path) -> None:
    """Training loss and held-out colour+shape accuracy during training, against chance and the colour baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((model_dir / "trainer_state.json").read_text())["log_history"]
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    accuracy = [(e["step"], e["eval_zeroshot_top1"]) for e in history if "eval_zeroshot_top1" in e]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if losses:
        loss_axis.plot(*zip(*losses, strict=True), marker=".")
    loss_axis.set(title="training loss (CLIP)", xlabel="step", ylabel="loss")
    if accuracy:
        metric_axis.plot(*zip(*accuracy, strict=True), marker="o", label="colour+shape, held-out pairs")
    held_out = results["zero_shot"]["color_shape_held_out_pairs"]
    metric_axis.axhline(held_out["chance"], color="grey", linestyle="--", label="chance")
    if held_out.get("baseline") is not None:
        metric_axis.axhline(held_out["baseline"], color="grey", linestyle=":", label="right colour, random shape")
    metric_axis.set(title="zero-shot top-1 during training", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    metric_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "demo_output"), help="data and runs go here")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="model preset name, or an MSClipConfig JSON file")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument(
        "--learning_rate", "--learning-rate", type=float, default=1e-3, help="peak learning rate (cosine schedule)"
    )
    parser.add_argument(
        "--warmup_steps", "--warmup-steps", type=int, default=None, help="linear warm-up (default: a tenth of --steps)"
    )
    parser.add_argument(
        "--crop_scale_min",
        "--crop-scale-min",
        type=float,
        default=0.9,
        help="random-resized-crop area lower bound (1: no augmentation)",
    )
    parser.add_argument("--num_train", "--num-train", type=int, default=8000, help="training scenes to draw")
    parser.add_argument(
        "--image_size", "--image-size", type=int, default=64, help="pixels; must match the preset's image_size"
    )
    parser.add_argument(
        "--vocab_size",
        "--vocab-size",
        type=int,
        default=591,
        help="BPE vocabulary size (591: every merge the demo captions allow)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--table_from",
        "--table-from",
        metavar="RESULTS_JSON",
        help="print the markdown table of a finished run's results.json and stop",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Draw the data, train the tokenizer, pre-train, evaluate, plot; or only render a table (``--table_from``)."""
    args = parse_arguments(argv)
    if args.table_from:
        print(markdown_table(json.loads(Path(args.table_from).read_text())))
        return
    started = time.time()
    timings: dict[str, float] = {}
    output = Path(args.output)
    data = prepare_data(output / "data" / "shapes", args.num_train, demo_shapes_config(args.image_size))
    timings["data_s"] = time.time() - started
    run_dir = output / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    mark = time.time()
    tokenizer = train_tokenizer(data, run_dir / "tokenizer", args.vocab_size)
    timings["tokenizer_s"] = time.time() - mark
    mark = time.time()
    model_dir = pretrain(run_dir, data, tokenizer, args)
    timings["pretraining_s"] = time.time() - mark
    mark = time.time()
    results = evaluate(model_dir, data)
    timings["evaluation_s"] = time.time() - mark
    timings["total_s"] = time.time() - started
    settings = {key: value for key, value in vars(args).items() if key not in ("output", "table_from")}
    results["settings"] = {**settings, "shapes": asdict(demo_shapes_config(args.image_size))}
    results["timings"] = {key: round(value, 1) for key, value in timings.items()}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(model_dir, results, run_dir / "curves.png")
    print_table(results)
    print(
        f"\n[demo] results: {run_dir / 'results.json'}  curves: {run_dir / 'curves.png'}  "
        f"model: {model_dir}  ({timings['total_s']:.0f} s)"
    )


if __name__ == "__main__":
    main()
