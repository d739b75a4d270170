"""Fine-tuning `MSClipForImageClassification` with the plain `Trainer` (modeling_msclip/finetuning_msclip.py).

End to end on tiny class folders of solid colours: a random msclip-s-tiny checkpoint is saved, fine-tuned for a few
dozen steps and reloaded. Plus the pieces with hand-computed numbers: accuracy, label alignment, folder detection,
loading from a pre-training checkpoint and the text-initialised head.
"""

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale
from PIL import Image
from transformers import AutoModelForImageClassification, TrainerCallback, TrainingArguments

from modeling_msclip import MSClipConfig, MSClipForPreTraining, MSClipImageProcessor, MSClipModel, MSClipProcessor
from modeling_msclip.checkpointing_msclip import OutputArguments
from modeling_msclip.data_msclip import detect_format
from modeling_msclip.finetuning_msclip import (
    align_labels,
    build_classification_model,
    classification_metrics,
    initialize_head_from_text,
    load_classification_dataset,
)
from modeling_msclip.tokenization_msclip import MSClipTokenizer
from training.run_finetune_classification import DataArguments, ModelArguments, parse_arguments, run_finetuning

REPO_ROOT = Path(__file__).resolve().parents[1]
# Three classes that differ only in colour: trivially separable, so a few dozen steps must learn them.
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "dark_blue": (20, 40, 160)}


def write_color_folders(root: Path, per_class: int, seed: int, size: int = 48) -> None:
    """``root/<colour>/<i>.png``: solid colours with a little per-image brightness jitter and pixel noise."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            base = np.clip(np.array(rgb) + rng.integers(-20, 21), 0, 255)
            pixels = np.clip(base + rng.integers(-8, 9, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, msclip_tokenizer_dir) -> Path:
    """A random msclip-s-tiny MSClipModel with its processor (64 px images), as a pre-training run leaves it."""
    folder = tmp_path_factory.mktemp("msclip_checkpoint")
    torch.manual_seed(0)
    MSClipModel(MSClipConfig.from_preset("msclip-s-tiny")).save_pretrained(folder)
    processor = MSClipProcessor(
        image_processor=MSClipImageProcessor.from_preset("msclip", image_size=64),
        tokenizer=MSClipTokenizer.from_pretrained(msclip_tokenizer_dir),
    )
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def color_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("colors")
    write_color_folders(root / "train", per_class=8, seed=1)
    write_color_folders(root / "eval", per_class=4, seed=2)
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root / "train", root / "eval"


class CaptureStartWeights(TrainerCallback):
    """Copies the model's weights when training begins (before the first optimizer step)."""

    def __init__(self) -> None:
        self.state_dict: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_finetune_learns_colours_and_round_trips(saved_checkpoint, color_data, tmp_path):
    train_dir, eval_dir = color_data
    output_dir = tmp_path / "run"
    model_args = ModelArguments(model_name_or_path=str(saved_checkpoint))
    data_args = DataArguments(train_data=str(train_dir), eval_data=str(eval_dir), crop_scale_min=0.5)
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=20,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=12,
        learning_rate=1e-3,
        warmup_steps=3,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
    )
    start = CaptureStartWeights()
    trainer = run_finetuning(model_args, data_args, training_args, OutputArguments(), callbacks=[start])

    # Step 0: every weight but the new head is the checkpoint's (vision tower and its share of the shared blocks).
    checkpoint = MSClipModel.from_pretrained(saved_checkpoint).state_dict()
    assert start.state_dict is not None
    body = {key: value for key, value in start.state_dict.items() if not key.startswith("classifier.")}
    assert len(body) > 100 and set(body) <= set(checkpoint)
    assert all(torch.equal(value, checkpoint[key]) for key, value in body.items())

    # The corrupt image was skipped and counted; accuracy was reported and is far above chance (1/3).
    train_results = json.loads((output_dir / "train_results.json").read_text())
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert train_results["train_skipped_corrupt_image"] == 1 and train_results["train_samples"] == 24
    assert eval_results["eval_samples"] == 12 and eval_results["eval_skipped_corrupt_image"] == 0
    assert eval_results["eval_accuracy"] >= 0.9, eval_results

    # The accuracy is the fraction of correct argmax predictions of the saved model, recomputed here by hand.
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    image_processor = MSClipImageProcessor.from_pretrained(output_dir)
    label2id = reloaded.config.label2id
    paths = sorted(eval_dir.glob("*/*.png"))
    images = [Image.open(path).convert("RGB") for path in paths]
    labels = torch.tensor([label2id[path.parent.name.replace("_", " ")] for path in paths])
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = reloaded(pixel_values=pixel_values).logits
        trained_logits = trainer.model.eval()(pixel_values=pixel_values).logits
    assert_close_to_scale(logits, trained_logits, 1e-5, "logits of the reloaded model")
    assert (logits.argmax(-1) == labels).double().mean().item() == pytest.approx(eval_results["eval_accuracy"])
    assert reloaded.config.id2label == {0: "dark blue", 1: "green", 2: "red"}


# Run in a fresh interpreter with stdin closed: prints one JSON line per folder with the classes the Auto factories
# and the pipeline resolve and the top class of the pipeline and of the model itself. argv: import the package or
# not ("package" / "remote"), an image, then the folders.
LOAD_FOLDERS = """
import json, sys
import torch
from PIL import Image
if sys.argv[1] == "package":
    import modeling_msclip  # registers the classes with the Auto factories
    options = {}
else:
    options = {"trust_remote_code": True}
from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoProcessor, pipeline
image = Image.open(sys.argv[2]).convert("RGB")
for folder in sys.argv[3:]:
    image_processor = AutoImageProcessor.from_pretrained(folder, **options)
    model = AutoModelForImageClassification.from_pretrained(folder, **options).eval()
    processor = AutoProcessor.from_pretrained(folder, **options)
    classifier = pipeline("image-classification", model=folder, **options)
    with torch.no_grad():
        logits = model(**image_processor(images=[image], return_tensors="pt")).logits
    print(json.dumps({
        "image_processor": type(image_processor).__module__ + "." + type(image_processor).__name__,
        "model": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__name__,
        "pipeline": type(classifier).__name__,
        "pipeline_top": classifier(image, top_k=1)[0]["label"],
        "model_top": model.config.id2label[int(logits.argmax())],
        "package_imported": "modeling_msclip" in sys.modules,
    }))
"""


def _auto_map_targets(folder: Path) -> list[str]:
    """Every ``module.Class`` that an ``auto_map`` of a JSON file in ``folder`` names (nested ones too)."""
    targets = []

    def collect(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "auto_map":
                    for target in item.values():
                        targets.extend(t for t in (target if isinstance(target, list) else [target]) if t)
                else:
                    collect(item)

    for path in folder.glob("*.json"):
        collect(json.loads(path.read_text()))
    return targets


def test_a_finetuned_folder_loads_with_the_auto_classes_and_the_pipeline(saved_checkpoint, color_data, tmp_path):
    train_dir, eval_dir = color_data
    # Three sources of the processor: a preset (no checkpoint), a checkpoint holding only the image processor of a
    # processor_config.json (whose auto_map names AutoProcessor), and a checkpoint with the whole processor.
    image_only = tmp_path / "image_only_checkpoint"
    image_only.mkdir()
    for path in saved_checkpoint.iterdir():
        if not path.name.startswith("tokeniz"):
            (image_only / path.name).write_bytes(path.read_bytes())
    sources = {
        "preset": ModelArguments(model_preset="msclip-s-tiny"),
        "image_only": ModelArguments(model_name_or_path=str(image_only)),
        "full": ModelArguments(model_name_or_path=str(saved_checkpoint)),
    }
    folders = {}
    for name, model_args in sources.items():
        folders[name] = tmp_path / name
        training_args = TrainingArguments(
            output_dir=str(folders[name]),
            max_steps=2,
            per_device_train_batch_size=8,
            save_strategy="steps" if name == "image_only" else "no",
            save_steps=2,
            report_to="none",
            use_cpu=True,
        )
        run_finetuning(model_args, DataArguments(train_data=str(train_dir)), training_args)
    folders["image_only_checkpoint"] = folders["image_only"] / "checkpoint-2"  # saved during training
    for name, folder in folders.items():
        # No auto_map entry names a file that the folder lacks.
        assert _auto_map_targets(folder)
        for target in _auto_map_targets(folder):
            assert (folder / f"{target.split('.')[0]}.py").is_file(), f"{name}: auto_map names {target}"
    with pytest.raises(ValueError, match="holds an image processor but no tokenizer.*AutoImageProcessor"):
        MSClipProcessor.from_pretrained(folders["preset"])
    image = sorted(eval_dir.glob("red/*.png"))[0]

    def load(mode: str, *names: str) -> list[dict]:
        env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
        result = subprocess.run(
            [sys.executable, "-c", LOAD_FOLDERS, mode, str(image), *(str(folders[name]) for name in names)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = result.stdout + result.stderr
        assert "custom code" not in output, output[-3000:]
        assert result.returncode == 0, output[-3000:]
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    # With the package imported its own classes answer, without a remote-code question.
    for name, loaded in zip(folders, load("package", *folders)):
        assert loaded["image_processor"] == "modeling_msclip.image_processing_msclip.MSClipImageProcessor", name
        assert loaded["model"] == "modeling_msclip.modeling_msclip.MSClipForImageClassification", name
        # AutoProcessor gives the image processor where there is no tokenizer, as transformers does for ViT.
        assert loaded["processor"] == ("MSClipProcessor" if name == "full" else "MSClipImageProcessor"), name
        assert loaded["pipeline"] == "ImageClassificationPipeline" and loaded["package_imported"]
        assert loaded["pipeline_top"] == loaded["model_top"], name
    # Without it, trust_remote_code=True loads the copied files.
    for name, loaded in zip(["preset", "image_only"], load("remote", "preset", "image_only")):
        assert loaded["image_processor"].startswith("transformers_modules.") and not loaded["package_imported"]
        assert loaded["model"].startswith("transformers_modules.") and loaded["model"].endswith(
            "MSClipForImageClassification"
        )
        assert loaded["processor"] == "MSClipImageProcessor", name
        assert loaded["pipeline_top"] == loaded["model_top"], name


def test_output_dir_is_not_overwritten_silently(saved_checkpoint, color_data, tmp_path):
    train_dir, _ = color_data
    (tmp_path / "notes.txt").write_text("keep me")
    model_args = ModelArguments(model_name_or_path=str(saved_checkpoint))
    training_args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run_finetuning(model_args, DataArguments(train_data=str(train_dir)), training_args)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_script_parses_its_arguments_and_shows_help(monkeypatch, capsys):
    model_args, data_args, training_args, output_args = parse_arguments(
        ["--model_preset", "msclip-s-tiny", "--train_data", "x", "--output_dir", "o", "--init_head_from_text"]
    )
    assert model_args.model_preset == "msclip-s-tiny" and model_args.init_head_from_text
    assert data_args.train_data == "x" and training_args.output_dir == "o" and not output_args.overwrite_output_dir
    script = REPO_ROOT / "training" / "run_finetune_classification.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0 and "--init_head_from_text" in capsys.readouterr().out


def test_classification_metrics_hand_computed():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 1, 1, 2, 1])
    # Predictions 0, 1, 2, 0, 1: correct 1, 1, 0, 0, 1 -> accuracy 3/5; recalls class 0: 1, class 1: 2/3, class 2: 0.
    metrics = classification_metrics(logits, labels)
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="logits"):
        classification_metrics(logits, labels[:3])


def test_folder_detection_and_label_alignment(tmp_path):
    # Fashion-MNIST layout: root/<split>/<class>/*.png with metadata.jsonl next to the class folders.
    for split in ("train", "test"):
        for name in ("bag", "ankle_boot"):
            (tmp_path / "fm" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "fm" / split / name / "0.png")
        (tmp_path / "fm" / split / "metadata.jsonl").write_text('{"file_name": "bag/0.png", "text": "a bag"}\n')
    # Shapes layout: root/<split>/*.png next to metadata.jsonl (captions, no class folders).
    (tmp_path / "shapes" / "test").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "shapes" / "test" / "0.png")
    (tmp_path / "shapes" / "test" / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a circle"}\n')
    # One rule for every task (data_msclip.detect_format): a metadata file makes an image folder.
    assert detect_format(tmp_path / "fm") == "imagefolder"
    assert detect_format(tmp_path / "fm" / "test") == "imagefolder"
    assert detect_format(tmp_path / "shapes") == "imagefolder"
    assert detect_format(tmp_path / "shapes" / "test") == "imagefolder"
    # Without a label column, classification refuses it and points at its class sub-folders ...
    with pytest.raises(ValueError, match=r"no label column.*'image', 'text'.*ankle_boot, bag.*format='classfolder'"):
        load_classification_dataset(tmp_path / "fm", split="test")
    # ... which format="classfolder" reads, ignoring the metadata.
    dataset, names = load_classification_dataset(tmp_path / "fm", split="test", format="classfolder")
    assert names == ["ankle boot", "bag"] and sorted(dataset["label"]) == [0, 1]

    # Integer labels named by a list, -1 dropped; evaluation data renumbered to the training classes by name.
    train = datasets.Dataset.from_dict({"image": ["a.png"] * 4, "label": [0, 2, 1, -1]})
    train, names = load_classification_dataset(train, class_names=["cat", "dog", "eel"])
    assert names == ["cat", "dog", "eel"] and train["label"] == [0, 2, 1]
    other = datasets.Dataset.from_dict({"image": ["b.png"] * 3, "label": ["eel", "cat", "eel"]})
    other, other_names = load_classification_dataset(other)
    assert other_names == ["cat", "eel"] and other["label"] == [1, 0, 1]
    assert align_labels(other, train)["label"] == [2, 0, 2]
    stranger, _ = load_classification_dataset(datasets.Dataset.from_dict({"image": ["c.png"], "label": ["fox"]}))
    with pytest.raises(ValueError, match="fox"):
        align_labels(stranger, train)


def test_classifier_loads_the_vision_tower_of_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(1)
    pretraining = MSClipForPreTraining(MSClipConfig.from_preset("msclip-s-tiny"))
    pretraining.save_pretrained(tmp_path)
    model = build_classification_model(["a", "b"], checkpoint=str(tmp_path))
    source = pretraining.state_dict()
    body = {key: value for key, value in model.state_dict().items() if not key.startswith("classifier.")}
    assert all(torch.equal(value, source[f"msclip.{key}"]) for key, value in body.items())
    assert model.config.id2label == {0: "a", 1: "b"} and model.classifier.out_features == 2


def test_patch_dropout_of_a_checkpoint_is_reported_and_can_be_switched_off(tmp_path, caplog):
    config = MSClipConfig.from_preset("clip-tiny", vision_config={"image_size": 64, "patch_size": 16})
    config.vision_config.patch_dropout = 0.5
    MSClipForPreTraining(config).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="modeling_msclip.finetuning_msclip"):
        kept = build_classification_model(["a", "b"], checkpoint=str(tmp_path))
    assert kept.config.vision_config.patch_dropout == 0.5
    assert "--patch_dropout 0" in caplog.text
    whole = build_classification_model(["a", "b"], checkpoint=str(tmp_path), patch_dropout=0.0)
    pixels = torch.randn(2, 3, 64, 64)

    def tokens(model: torch.nn.Module) -> int:
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].shape[1]

    assert tokens(whole.train()) == 1 + 16  # every patch while training
    assert tokens(kept.eval()) == 1 + 16
    assert tokens(kept.train()) == 1 + 8


@pytest.mark.parametrize("preset", ["msclip-s-tiny", "single-tower-tiny"])
def test_text_initialised_head_gives_the_zero_shot_logits(preset, msclip_tokenizer_dir, tmp_path):
    torch.manual_seed(2)
    clip_model = MSClipModel(MSClipConfig.from_preset(preset)).eval()
    if "final_layer_norm" in clip_model.config.shared_head_components:
        # One LayerNorm for both modalities: make it matter.
        shared_norm = clip_model.projection_head.final_layer_norm["shared"]
        with torch.no_grad():
            shared_norm.weight.uniform_(0.5, 1.5)
            shared_norm.bias.normal_()
    clip_model.save_pretrained(tmp_path)
    names = ["red", "green", "blue"]
    classifier = build_classification_model(names, checkpoint=str(tmp_path)).eval()
    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    templates = ["a photo of a {}.", "a {} square."]
    size = clip_model.config.vision_config.image_size
    pixels = torch.randn(5, 3, size, size)
    scale = initialize_head_from_text(classifier, clip_model, tokenizer, names, templates, pixels)
    with torch.no_grad():
        image_embeds = clip_model.get_image_features(pixel_values=pixels).pooler_output
        prompts = [template.format(name) for name in names for template in templates]
        text_embeds = clip_model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
        logits = classifier(pixel_values=pixels).logits
    # Zero-shot classifier by hand: normalise each prompt, average per class, normalise again.
    normalize = torch.nn.functional.normalize
    class_embeds = normalize(normalize(text_embeds.pooler_output, dim=-1).view(3, 2, -1).mean(1), dim=-1)
    cosine = normalize(image_embeds, dim=-1) @ class_embeds.T
    expected_scale = clip_model.logit_scale.exp().item() / image_embeds.norm(dim=-1).mean().item()
    assert scale == pytest.approx(expected_scale, rel=1e-5)
    expected_logits = scale * image_embeds.norm(dim=-1, keepdim=True) * cosine
    assert_close_to_scale(logits, expected_logits, 1e-5, "logits of the text-initialised head")
    assert torch.equal(classifier.classifier.bias, torch.zeros(3))


RECIPE_MARK = "<!-- docs-test: by: tests/test_finetune.py::test_the_documented_plain_trainer_recipe_runs"


def _finetune_recipe() -> tuple[str, list[str]]:
    """The fenced python block after the ``<!-- docs-test: by: ...this test... -->`` comment of docs/finetuning.md and
    the names whose values the comment says are replaced."""
    text = (REPO_ROOT / "docs" / "finetuning.md").read_text()
    assert text.count(RECIPE_MARK) == 1
    comment = text[text.index(RECIPE_MARK) : text.index("-->", text.index(RECIPE_MARK))]
    listed = " ".join(comment.split("values of", 1)[1].split(" replaced", 1)[0].split())
    names = [name.strip() for name in listed.replace(" and ", ", ").split(",")]
    after = text[text.index("-->", text.index(RECIPE_MARK)) + 3 :]
    assert after.startswith("\n```python\n")
    return after[len("\n```python\n") : after.index("\n```\n")], names


def test_the_documented_plain_trainer_recipe_runs(saved_checkpoint, tmp_path):
    code, names = _finetune_recipe()
    assert names == ["checkpoint", "data_dir", "output_dir", "max_steps", "batch_size"]
    # Tiny data in the recipe's layout: data_dir/<split>/<class>/*.png; the test split lacks one class.
    write_color_folders(tmp_path / "data" / "train", per_class=6, seed=3, size=24)
    write_color_folders(tmp_path / "data" / "test", per_class=3, seed=4, size=24)
    for path in (tmp_path / "data" / "test" / "green").iterdir():
        path.unlink()
    (tmp_path / "data" / "test" / "green").rmdir()
    values = {
        "checkpoint": repr(str(saved_checkpoint)),
        "data_dir": repr(str(tmp_path / "data")),
        "output_dir": repr(str(tmp_path / "run")),
        "max_steps": "8",
        "batch_size": "6",
    }
    for name, value in values.items():
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.M)
        assert count == 1, f"the recipe must assign {name} once"
    namespace: dict = {"__name__": "finetune_recipe"}
    exec(compile(code, "docs/finetuning.md:finetune-recipe", "exec"), namespace)

    # Without evaluate (not installed here) the numpy fallback scored it; either way, the accuracy of the saved
    # model recomputed by hand on the test images.
    import importlib.util

    assert (namespace["accuracy"] is None) == (importlib.util.find_spec("evaluate") is None)
    assert namespace["class_names"] == ["dark blue", "green", "red"]  # sorted, with the class absent from test
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "run").eval()
    assert reloaded.config.id2label == {0: "dark blue", 1: "green", 2: "red"}
    paths = sorted((tmp_path / "data" / "test").glob("*/*.png"))
    pixels = MSClipImageProcessor.from_pretrained(tmp_path / "run")(
        images=[Image.open(path).convert("RGB") for path in paths], return_tensors="pt"
    )["pixel_values"]
    labels = torch.tensor([reloaded.config.label2id[path.parent.name.replace("_", " ")] for path in paths])
    with torch.no_grad():
        predictions = reloaded(pixel_values=pixels).logits.argmax(-1)
    assert namespace["metrics"]["eval_accuracy"] == pytest.approx((predictions == labels).double().mean().item())
    assert namespace["trainer"].state.global_step == 8
    for target in _auto_map_targets(tmp_path / "run"):
        assert (tmp_path / "run" / f"{target.split('.')[0]}.py").is_file(), target


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(saved_checkpoint, tmp_path):
    """The plain `Trainer` with 2 micro-batches of 4 must update the classifier as one batch of 8 does.

    Found: the models' forwards took ``**kwargs``, so transformers' Trainer believed they normalise their loss by its
    ``num_items_in_batch`` and stopped dividing by the accumulation steps; the classifier's loss is a mean over
    each micro-batch, so with 2 micro-batches its step was twice the batch-of-8 step. (Contrastive pre-training has
    no such equality: its negatives are the micro-batch's; `--gradcache` gives the large batch's loss there.)"""
    from transformers import Trainer

    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(8, 3, 64, 64, generator=generator)
    records = [{"pixel_values": pixel_values[i], "labels": i % 3} for i in range(8)]

    def load():
        torch.manual_seed(0)
        return AutoModelForImageClassification.from_pretrained(saved_checkpoint, num_labels=3)

    def trained(per_device: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = load()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{per_device}x{accumulation}"), per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1, optim="sgd",
            lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=1e9, report_to="none", save_strategy="no", use_cpu=True,
            dataloader_drop_last=True, seed=0, data_seed=0,
        )  # fmt: skip
        model.eval()  # no dropout or batch statistics: both runs see the same function
        trainer = Trainer(model=model, args=args, train_dataset=records, data_collator=_stack)
        trainer.model.train = lambda mode=True: model  # keep eval mode through training
        trainer.train()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    one_batch, accumulated = trained(8, 1), trained(4, 2)
    start = load().state_dict()
    moved = [name for name in one_batch if not torch.equal(one_batch[name], start[name])]
    assert moved, "the step changed nothing"
    for name in moved:
        assert_close_to_scale(accumulated[name] - start[name], one_batch[name] - start[name], 1e-4, name)


def _stack(records: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(r[key]) for r in records]) for key in records[0]}
