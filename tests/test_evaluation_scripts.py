"""training/run_evaluation.py and the data formats the evaluation CLI reads (evaluation_msclip.load_eval_dataset).

A random msclip-s-tiny model is evaluated on a tiny shapes dataset. The numbers of the shapes evaluation
(processing/shapes_dataset.py) are checked against the generic `evaluate_zero_shot` / `evaluate_retrieval` on the
same data loaded by the classification loader, and the same images read from different formats (image folder vs
webdataset shards, class folders vs a save_to_disk dataset) must give the same metrics.
"""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from modeling_msclip import MSClipConfig, MSClipImageProcessor, MSClipModel, MSClipProcessor
from modeling_msclip import evaluation_msclip as ev
from modeling_msclip.encoding_msclip import load_model_and_processor
from modeling_msclip.metrics_msclip import linear_probe
from modeling_msclip.records_msclip import decode_image
from modeling_msclip.tokenization_msclip import MSClipTokenizer
from processing.shapes_dataset import (
    COLOR_NAMES,
    ZERO_SHOT_TASKS,
    ShapesConfig,
    evaluate_shapes_dataset,
    write_shapes_dataset,
)
from training import run_evaluation

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TEST = 24


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, msclip_tokenizer_dir) -> Path:
    folder = tmp_path_factory.mktemp("msclip_model")
    torch.manual_seed(0)
    MSClipModel(MSClipConfig.from_preset("msclip-s-tiny")).save_pretrained(folder)
    MSClipProcessor(
        image_processor=MSClipImageProcessor.from_preset("msclip", image_size=64),
        tokenizer=MSClipTokenizer.from_pretrained(msclip_tokenizer_dir),
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny shapes test split as an image folder and as webdataset shards."""
    root = tmp_path_factory.mktemp("shapes")
    config = ShapesConfig(image_size=32)
    sizes = {"num_train": 0, "num_validation": 0, "num_test": NUM_TEST, "config": config}
    folder = write_shapes_dataset(root / "imagefolder", **sizes)
    shards = write_shapes_dataset(root / "webdataset", data_format="webdataset", samples_per_shard=10, **sizes)
    return folder, shards


def test_run_evaluation_script_on_shapes_writes_zero_shot_and_retrieval(saved_model, shapes_dirs, tmp_path):
    folder, _ = shapes_dirs
    output = tmp_path / "results.json"
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "run_evaluation.py"),
        "--model",
        str(saved_model),
        "--shapes-data",
        str(folder),
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--output",
        str(output),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "shapes_zeroshot_color" in completed.stdout and "shapes_retrieval" in completed.stdout  # the table
    results = json.loads(output.read_text())
    expected = {f"shapes_zeroshot_{name}" for name in ZERO_SHOT_TASKS} | {"shapes_retrieval"}
    assert expected <= set(results)
    for name in ZERO_SHOT_TASKS:
        metrics = results[f"shapes_zeroshot_{name}"]
        assert metrics["num_samples"] == NUM_TEST and metrics["num_classes"] == len(ZERO_SHOT_TASKS[name].class_names)
        assert 0.0 <= metrics["top1"] <= 1.0 and metrics["num_skipped"] == 0
    # Held-out and seen colour x shape pairs partition the test split.
    split_sizes = [
        results.get(f"shapes_zeroshot_color_shape_{part}", {}).get("num_samples", 0)
        for part in ("seen_pairs", "held_out_pairs")
    ]
    assert sum(split_sizes) == NUM_TEST
    assert results["shapes_retrieval"]["num_images"] == NUM_TEST
    assert results["shapes_retrieval"]["num_texts"] == NUM_TEST  # one caption per image
    # An existing result file is kept unless --overwrite (checked before any model is loaded).
    with pytest.raises(SystemExit):
        run_evaluation.main(command[2:])
    assert json.loads(output.read_text()) == results


def test_shapes_evaluation_equals_the_generic_evaluations(saved_model, shapes_dirs):
    folder, shards = shapes_dirs
    model, processor = load_model_and_processor(saved_model, "cpu")
    shapes = evaluate_shapes_dataset(model, processor, folder, tasks=["color"], batch_size=8)
    assert set(shapes) == {"zeroshot_color", "retrieval"}
    # Shards keep the labels inside each sample's JSON: refused with the reason, not scored as all-skipped.
    with pytest.raises(ValueError, match="image-folder format"):
        evaluate_shapes_dataset(model, processor, shards, tasks=["color"], batch_size=8)

    task = ZERO_SHOT_TASKS["color"]
    labelled = ev.load_eval_dataset(
        folder, split="test", purpose="classification", label_column="color_label", class_names=list(COLOR_NAMES)
    )
    direct = ev.evaluate_zero_shot(model, processor, labelled, list(task.class_names), task.templates, batch_size=5)
    for key in ("top1", "top5", "mean_per_class_recall", "cross_entropy", "num_samples"):
        assert shapes["zeroshot_color"][key] == pytest.approx(direct[key], rel=1e-5, abs=1e-6)

    # Integer labels without names cannot make zero-shot prompts.
    with pytest.raises(ValueError, match="class names"):
        ev.load_eval_dataset(
            folder, split="test", purpose="classification", label_column="color_label", require_class_names=True
        )

    captioned = ev.load_eval_dataset(folder, split="test", purpose="retrieval")
    retrieval = ev.evaluate_retrieval(model, processor, captioned, batch_size=5)
    # The same samples read from webdataset shards give the same retrieval numbers.
    from_shards = ev.evaluate_retrieval(
        model, processor, ev.load_eval_dataset(shards, split="test", purpose="retrieval"), batch_size=7
    )
    for key, value in retrieval.items():
        assert shapes["retrieval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert from_shards[key] == pytest.approx(value, rel=1e-5, abs=1e-6)

    # A save_to_disk DatasetDict with one split loads like the other readers load it: that split, no --split needed.
    datasets.DatasetDict({"test": captioned}).save_to_disk(str(folder.parent / "saved_dict"))
    from_saved = ev.load_eval_dataset(folder.parent / "saved_dict", purpose="retrieval")
    assert from_saved["text"] == captioned["text"]
    with pytest.raises(ValueError, match="no split 'train'"):
        ev.load_eval_dataset(folder.parent / "saved_dict", split="train", purpose="retrieval")


def test_class_folders_with_splits_and_saved_datasets_give_the_same_zero_shot(saved_model, tmp_path):
    # Fashion-MNIST layout (processing/fashion_mnist.py): root/<split>/<class>/*.png next to metadata.jsonl.
    colors = {"red": (230, 20, 20), "ankle_boot": (20, 20, 20), "sky_blue": (120, 180, 240)}
    rows = []
    for split in ("train", "test"):
        for name, rgb in colors.items():
            (tmp_path / "fm" / split / name).mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (40, 40), tuple(v + 5 * index for v in rgb)).save(
                    tmp_path / "fm" / split / name / f"{index}.png"
                )
                rows.append({"file_name": f"{name}/{index}.png", "text": f"a {name.replace('_', ' ')}"})
        metadata = "".join(json.dumps(row) + "\n" for row in rows)
        (tmp_path / "fm" / split / "metadata.jsonl").write_text(metadata)
        rows = []

    model, processor = load_model_and_processor(saved_model, "cpu")
    # The metadata file makes it an image folder, and it has no label column: classification asks for the format.
    with pytest.raises(ValueError, match="no label column.*format='classfolder'"):
        ev.load_eval_dataset(tmp_path / "fm", split="test", purpose="classification")
    labelled = ev.load_eval_dataset(tmp_path / "fm", split="test", purpose="classification", format="classfolder")
    assert ev.class_names_from_dataset(labelled) == ["ankle boot", "red", "sky blue"]
    from_folders = ev.evaluate_zero_shot(model, processor, labelled, batch_size=4)
    assert from_folders["num_samples"] == 6 and from_folders["num_classes"] == 3

    labelled.save_to_disk(tmp_path / "saved")
    from_disk = ev.evaluate_zero_shot(
        model, processor, ev.load_eval_dataset(tmp_path / "saved", purpose="classification"), batch_size=4
    )
    assert from_disk["top1"] == pytest.approx(from_folders["top1"])
    assert from_disk["cross_entropy"] == pytest.approx(from_folders["cross_entropy"], rel=1e-5)

    # The same folder read for retrieval uses the captions of metadata.jsonl.
    captioned = ev.load_eval_dataset(tmp_path / "fm", split="test", purpose="retrieval")
    assert sorted(captioned["text"]) == sorted(["a red", "a ankle boot", "a sky blue"] * 2)

    # Several splits and none chosen: a clear error naming them.
    with pytest.raises(ValueError, match="split"):
        ev.load_eval_dataset(tmp_path / "fm", purpose="retrieval")


def test_a_finetuned_classifier_is_refused_for_text_tasks_and_probed_on_its_vision_features(
    msclip_tokenizer_dir, shapes_dirs, tmp_path, capsys
):
    # A fine-tuned classifier folder as fine-tuning writes it from a checkpoint with a tokenizer: vision tower +
    # head and the whole processor, so an MSClipModel loads from it (text tower and projection random).
    from modeling_msclip import MSClipForImageClassification
    from modeling_msclip.finetuning_msclip import finish_classifier_folder

    folder = tmp_path / "classifier"
    torch.manual_seed(3)
    names = ["blue", "green", "red"]
    config = MSClipConfig.from_preset("msclip-s-tiny", id2label=dict(enumerate(names)))
    config.architectures = ["MSClipForImageClassification"]
    classifier = MSClipForImageClassification(config).eval()
    classifier.save_pretrained(folder)
    image_processor = MSClipImageProcessor.from_preset("msclip", image_size=64)
    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    MSClipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    finish_classifier_folder(folder)
    data = tmp_path / "data"
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 160)}
    for split, count in (("train", 4), ("test", 3)):
        for name, colour in rgb.items():
            (data / split / name).mkdir(parents=True)
            for index in range(count):
                shade = tuple(min(255, value + 9 * index) for value in colour)
                Image.new("RGB", (40, 40), shade).save(data / split / name / f"{index}.png")

    # Zero-shot, retrieval and the shapes tasks need the text tower it lacks: refused before anything is computed.
    folder_data, _ = shapes_dirs
    for option, source in (
        ("--zero-shot-data", data),
        ("--retrieval-data", folder_data),
        ("--shapes-data", folder_data),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_evaluation.main(["--model", str(folder), option, str(source), "--split", "test", "--device", "cpu"])
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert "is a fine-tuned image classifier (MSClipForImageClassification)" in message, message
        assert f"--{option[2:].replace('-', '_')} cannot be evaluated" in message and "no text tower" in message
        assert "eval_results.json" in message and "--linear_probe_train" in message
    with pytest.raises(ValueError, match="fine-tuned image classifier"):
        load_model_and_processor(folder, "cpu")
    # A checkpoint that lacks weights MSClipModel needs is refused too, naming them (here the classifier's weights
    # with a config that does not say what it is).
    partial = tmp_path / "partial"
    MSClipForImageClassification(MSClipConfig.from_preset("msclip-s-tiny")).save_pretrained(partial)
    partial_config = json.loads((partial / "config.json").read_text())
    del partial_config["architectures"]
    (partial / "config.json").write_text(json.dumps(partial_config))
    with pytest.raises(ValueError, match=r"lacks \d+ weight"):
        load_model_and_processor(partial, "cpu")

    # The linear probe runs on its vision features: the pooled class token that its head reads.
    argv = ["--model", str(folder), "--device", "cpu", "--batch-size", "5"]
    argv += ["--linear-probe-train", str(data / "train"), "--linear-probe-test", str(data / "test")]
    probe = run_evaluation.main(argv)["linear_probe"]
    seen = []
    hook = classifier.classifier.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))

    def head_inputs(split: str):
        dataset = ev.load_eval_dataset(data / split, purpose="classification")
        images = [decode_image(record["image"]) for record in dataset]
        seen.clear()
        with torch.no_grad():
            classifier(pixel_values=image_processor(images=images, return_tensors="pt")["pixel_values"])
        return seen[0], torch.tensor(dataset["label"])

    by_hand = linear_probe(*head_inputs("train"), *head_inputs("test"))
    hook.remove()
    assert probe["num_train"] == 12 and probe["num_test"] == 9 and probe["num_classes"] == 3
    assert probe["accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-9)
    assert probe["best_l2"] == by_hand["best_l2"]
