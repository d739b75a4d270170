"""The main job of ``make demo``: pre-train a tiny MS-CLIP-S on the embedded shapes data, then evaluate it.

1. draws the embedded dataset (procedural shapes with compositional captions; no download) into
   ``demo_output/data/shapes`` (reused on later runs);
2. builds the tokenizer from the CLIP BPE file (``../shared/reference/msclip_official/tokenizer/`` or ``--vocab``);
3. pre-trains ``msclip-s-tiny`` on CPU with ``accelerate launch training/run_pretrain.py``, evaluating zero-shot
   accuracy on held-out colour/shape combinations while it trains;
4. evaluates zero-shot classification (shape, colour, colour+shape; all test images and only the held-out
   combinations never seen in training) and image<->text retrieval, prints a table against chance and writes
   ``results.json`` and ``curves.png`` into a new ``demo_output/runs/<timestamp>/`` folder.

Usage: ``python -m training.demo [--steps 400] [--batch-size 64] [--output demo_output]`` (the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = REPO.parent / "shared" / "reference" / "msclip_official" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"


def find_vocab(path: str | None) -> Path:
    candidate = Path(path) if path else Path(os.environ.get("MSCLIP_VOCAB", DEFAULT_VOCAB))
    if not candidate.is_file():
        raise SystemExit(
            f"error: the CLIP BPE vocabulary was not found at {candidate}. Pass --vocab PATH or set MSCLIP_VOCAB to "
            "OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz (MIT licence)."
        )
    return candidate


def prepare_data(folder: Path, num_train: int) -> Path:
    from modeling_msclip.shapes_dataset import ShapesConfig, load_shapes_info, write_shapes_dataset

    # Captions mostly name just colour and shape: with size and position in every caption a batch of 64 can be told
    # apart without looking at shapes, and contrastive learning then never learns them.
    DEMO_SHAPES = ShapesConfig(image_size=64, size_drop_probability=0.7, position_drop_probability=0.7)
    splits = {"train": num_train, "validation": 200, "test": 600}
    if (folder / "shapes_info.json").is_file():
        info = load_shapes_info(folder)
        # Reused only if drawn with exactly these settings (compared as shapes_info.json stores them).
        if info.get("splits") == splits and info.get("config") == json.loads(json.dumps(asdict(DEMO_SHAPES))):
            print(f"[demo] reusing the shapes dataset in {folder}")
            return folder
    print(f"[demo] drawing {num_train} training scenes into {folder}")
    write_shapes_dataset(
        folder,
        num_train=splits["train"],
        num_validation=splits["validation"],
        num_test=splits["test"],
        config=DEMO_SHAPES,
        overwrite=folder.exists(),
    )
    return folder


def write_task_files(run_dir: Path, task_name: str) -> tuple[Path, Path, str]:
    from modeling_msclip.shapes_dataset import ZERO_SHOT_TASKS

    task = ZERO_SHOT_TASKS[task_name]
    classes, templates = run_dir / f"{task_name}_classes.txt", run_dir / f"{task_name}_templates.txt"
    classes.write_text("\n".join(task.class_names) + "\n")
    templates.write_text("\n".join(task.templates) + "\n")
    return classes, templates, task.label_column


def pretrain(run_dir: Path, data: Path, vocab: Path, steps: int, batch_size: int) -> Path:
    classes, templates, label_column = write_task_files(run_dir, "color_shape")
    heldout = run_dir / "heldout_test"
    _save_heldout_split(data, heldout)
    model_dir = run_dir / "model"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configuration" / "accelerate" / "single_process.yaml"),
        str(REPO / "training" / "run_pretrain.py"),
        "--model_preset",
        "msclip-s-tiny",
        "--vocab",
        str(vocab),
        "--train_data",
        str(data),
        "--train_split",
        "train",
        "--output_dir",
        str(model_dir),
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        str(batch_size),
        "--max_steps",
        str(steps),
        "--learning_rate",
        "1e-3",
        "--learning_rate_shared",
        "1e-3",
        "--weight_decay",
        "0.1",
        "--warmup_steps",
        str(max(1, steps // 10)),
        "--lr_scheduler_type",
        "cosine",
        "--logging_steps",
        "10",
        "--save_strategy",
        "no",
        "--dataloader_num_workers",
        "2",
        "--seed",
        "0",
        "--zeroshot_eval_data",
        str(heldout),
        "--zeroshot_label_column",
        label_column,
        "--zeroshot_class_names",
        str(classes),
        "--zeroshot_templates",
        str(templates),
        "--zeroshot_eval_steps",
        str(max(1, steps // 5)),
    ]
    print("[demo] " + " ".join(command))
    subprocess.run(command, check=True, cwd=REPO)
    return model_dir


def _save_heldout_split(data: Path, output: Path) -> None:
    """The test images whose colour+shape pair never occurs in training, saved with `save_to_disk`."""
    from modeling_msclip.data_msclip import load_image_text_dataset

    test = load_image_text_dataset(data, split="test")
    test.filter(lambda row: bool(row["held_out_pair"])).save_to_disk(str(output))


def evaluate(model_dir: Path, data: Path, run_dir: Path) -> dict:
    """Zero-shot accuracy of every shapes task (each test image encoded once) and retrieval, with chance levels."""
    from modeling_msclip import MSClipModel, MSClipProcessor
    from modeling_msclip.evaluation_msclip import evaluate_shapes_dataset

    model = MSClipModel.from_pretrained(model_dir).eval()
    processor = MSClipProcessor.from_pretrained(model_dir)
    raw = evaluate_shapes_dataset(model, processor, data, split="test")
    results: dict = {"zero_shot": {}, "retrieval": {}}
    for key, metrics in raw.items():
        if key.startswith("zeroshot_"):
            results["zero_shot"][key.removeprefix("zeroshot_")] = {
                "top1": metrics["top1"],
                "chance": 1.0 / metrics["num_classes"],
                "num_samples": metrics["num_samples"],
            }
    retrieval = raw["retrieval"]
    for direction in ("image_to_text", "text_to_image"):
        results["retrieval"][direction] = {
            "recall@1": retrieval[f"{direction}_recall@1"],
            "recall@5": retrieval[f"{direction}_recall@5"],
            "chance@1": 1.0 / retrieval["num_texts" if direction == "image_to_text" else "num_images"],
        }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def print_table(results: dict) -> None:
    rows = [("zero-shot " + name, m["top1"], m["chance"]) for name, m in results["zero_shot"].items()]
    rows += [(f"retrieval {name} R@1", m["recall@1"], m["chance@1"]) for name, m in results["retrieval"].items()]
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'task':<{width}}  {'accuracy':>8}  {'chance':>7}  {'x chance':>8}")
    for name, value, chance in rows:
        print(f"{name:<{width}}  {value:8.3f}  {chance:7.3f}  {value / chance:8.1f}")


def plot_curves(model_dir: Path, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((model_dir / "trainer_state.json").read_text())["log_history"]
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    accuracy = [(e["step"], e["eval_zeroshot_top1"]) for e in history if "eval_zeroshot_top1" in e]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(*zip(*losses, strict=True), marker=".")
    loss_axis.set(title="training loss (CLIP)", xlabel="step", ylabel="loss")
    if accuracy:
        metric_axis.plot(*zip(*accuracy, strict=True), marker="o", label="colour+shape, held-out pairs")
    chance = results["zero_shot"]["color_shape_held_out_pairs"]["chance"]
    metric_axis.axhline(chance, color="grey", linestyle="--", label="chance")
    metric_axis.set(title="zero-shot top-1 during training", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    metric_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "demo_output"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--vocab", default=None)
    args = parser.parse_args(argv)
    started = time.time()
    vocab = find_vocab(args.vocab)
    output = Path(args.output)
    data = prepare_data(output / "data" / "shapes", args.num_train)
    run_dir = output / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    model_dir = pretrain(run_dir, data, vocab, args.steps, args.batch_size)
    results = evaluate(model_dir, data, run_dir)
    plot_curves(model_dir, results, run_dir / "curves.png")
    print_table(results)
    print(
        f"\n[demo] results: {run_dir / 'results.json'}  curves: {run_dir / 'curves.png'}  "
        f"model: {model_dir}  ({time.time() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
