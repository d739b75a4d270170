"""Tests of modeling_msclip.evaluation_msclip (with encoding_msclip and evaluation_callback_msclip); the pure metric
functions are tested in test_metrics.py.

The model-driven wrappers are checked against an independent path through a real (tiny, randomly initialised)
`transformers.CLIPModel`, which has the same `get_*_features(...).pooler_output` API as MS-CLIP, and a real `Trainer`.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, build_tiny_transformers_clip
from PIL import Image

from modeling_msclip.encoding_msclip import encode_images, encode_texts, load_model_and_processor
from modeling_msclip.evaluation_callback_msclip import ZeroShotEvalCallback
from modeling_msclip.evaluation_msclip import (
    evaluate_linear_probe,
    evaluate_retrieval,
    evaluate_zero_shot,
    format_results_table,
    load_eval_dataset,
    save_results_json,
)
from modeling_msclip.metrics_msclip import linear_probe, retrieval_metrics
from training import run_evaluation

# ----------------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------------


def test_results_table_and_json(tmp_path):
    results = {
        "zeroshot": {"top1": 0.5, "num_samples": 4, "per_class_accuracy": {"a": 1.0}},
        "retrieval": {"image_to_text_recall@1": 1 / 3},
    }
    table = format_results_table(results).splitlines()
    assert table[0].split("|")[0].strip() == "task"
    assert [line.split("|")[2].strip() for line in table[2:]] == ["0.5000", "4", "0.3333"]
    assert not any("per_class" in line for line in table)
    path = save_results_json({"zeroshot": {"top1": float("nan"), "x": torch.tensor([1.0])}}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"zeroshot": {"top1": None, "x": [1.0]}}
    with pytest.raises(FileExistsError, match="overwrite"):
        save_results_json(results, path)
    save_results_json(results, path, overwrite=True)
    assert json.loads(path.read_text())["zeroshot"]["top1"] == 0.5


# ----------------------------------------------------------------------------------------------------------------------
# model-driven wrappers on a real tiny CLIPModel
# ----------------------------------------------------------------------------------------------------------------------

WORDS = ["a", "photo", "of", "the", "an", "image", "red", "green", "blue", "square", "thing", "."]


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_transformers_clip(WORDS)


def _images():
    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (220, 60, 60), (60, 220, 60), (60, 60, 220)]
    generator = np.random.default_rng(0)
    images = []
    for colour in colours:
        noise = generator.integers(-20, 20, size=(40, 48, 3))
        images.append(Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)))
    return images, [0, 1, 2, 0, 1, 2]


def test_encode_texts_matches_model_forward(tiny_clip):
    model, tokenizer, _ = tiny_clip
    texts = ["a photo of a red square .", "green", "the blue thing", "an image of the green square .", "red"]
    embeds = encode_texts(model, tokenizer, texts, batch_size=2)  # batches padded to different lengths
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, pixel_values=torch.zeros(1, 3, 32, 32))
    assert_close_to_scale(F.normalize(embeds, dim=-1), out.text_embeds, 1e-5, "text embeds")


def test_encode_images_processor_transform_and_tensor_agree(tiny_clip):
    model, _, image_processor = tiny_clip
    images, _ = _images()
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    from_processor = encode_images(model, image_processor, images, batch_size=4)
    from_tensor = encode_images(model, None, pixel_values, batch_size=5)
    from_transform = encode_images(
        model, lambda img: image_processor(images=[img], return_tensors="pt")["pixel_values"][0], images
    )
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=pixel_values).pooler_output
    for embeds in (from_processor, from_tensor, from_transform):
        assert_close_to_scale(embeds, reference, 1e-5, "image embeds")
    with pytest.raises(ValueError, match="image 1 cannot be read"):
        encode_images(model, image_processor, [images[0], "/nonexistent/file.png"])


def test_encode_images_reads_files_as_training_does(tiny_clip, tmp_path):
    # Training paints transparency onto white (records_msclip.decode_image); evaluation must see the same pixels.
    model, _, image_processor = tiny_clip
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "transparent_red.png")
    from_file = encode_images(model, image_processor, [str(tmp_path / "transparent_red.png")])
    white = encode_images(model, image_processor, [Image.new("RGB", (32, 32), (255, 255, 255))])
    assert_close_to_scale(from_file, white, 1e-6, "transparent file vs white image")


def test_evaluate_zero_shot_matches_forward_logits_and_skips_bad_records(tiny_clip, tmp_path):
    import datasets

    model, tokenizer, image_processor = tiny_clip
    images, labels = _images()
    names = ["red", "green", "blue"]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}),
    )
    model.train()
    template = ("a photo of the {} thing .",)
    metrics = evaluate_zero_shot(model, (tokenizer, image_processor), dataset, templates=template, batch_size=4)
    assert model.training  # the training flag is restored
    # Independent path: the model's own forward logits between every image and every class prompt.
    model.eval()
    prompts = tokenizer([template[0].format(n) for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompts, **image_processor(images=images, return_tensors="pt")).logits_per_image
    expected_top1 = (logits.argmax(dim=1) == torch.tensor(labels)).double().mean().item()
    assert metrics["top1"] == pytest.approx(expected_top1)
    assert metrics["num_samples"] == 6 and metrics["num_skipped"] == 0
    assert set(metrics["per_class_accuracy"]) == set(names)

    # A row with a missing file and one with an out-of-range label are skipped and counted, not fatal.
    rows = [{"image": img, "label": lab} for img, lab in zip(images, labels)]
    rows += [{"image": str(tmp_path / "missing.png"), "label": 0}, {"image": images[0], "label": 7}]
    skipped = evaluate_zero_shot(model, (tokenizer, image_processor), rows, names, template, batch_size=4)
    assert skipped["num_skipped"] == 2 and skipped["num_samples"] == 6
    assert skipped["top1"] == pytest.approx(expected_top1)


def test_evaluate_retrieval_matches_metric_on_forward_embeddings(tiny_clip):
    model, tokenizer, image_processor = tiny_clip
    images, _ = _images()
    captions = [
        ["red square", "a red thing"],
        "green square",
        ["blue thing", "the blue square ."],
        "red",
        ["green thing"],
        "blue",
    ]
    rows = [{"image": img, "text": cap} for img, cap in zip(images, captions)]
    metrics = evaluate_retrieval(model, (tokenizer, image_processor), rows, batch_size=4)
    flat = [c for cap in captions for c in ([cap] if isinstance(cap, str) else cap)]
    owners = torch.tensor([i for i, cap in enumerate(captions) for _ in ([cap] if isinstance(cap, str) else cap)])
    model.eval()
    with torch.no_grad():
        out = model(
            **tokenizer(flat, padding=True, return_tensors="pt"), **image_processor(images=images, return_tensors="pt")
        )
    expected = retrieval_metrics(out.image_embeds, out.text_embeds, owners)
    for key in ("image_to_text_recall@1", "text_to_image_recall@1", "text_to_image_recall@5"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["num_texts"] == 8 and metrics["num_skipped"] == 0


def test_evaluate_linear_probe_equals_probe_on_encoded_features(tiny_clip):
    model, _, image_processor = tiny_clip
    images, labels = _images()
    rows = [{"image": img, "label": lab} for img, lab in zip(images, labels)]
    result = evaluate_linear_probe(model, (None, image_processor), rows * 2, rows, l2_grid=(1e-2,))
    features = encode_images(model, image_processor, images)
    expected = linear_probe(
        features.repeat(2, 1), torch.tensor(labels * 2), features, torch.tensor(labels), l2_grid=(1e-2,)
    )
    assert result["accuracy"] == expected["accuracy"] and result["num_skipped"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Trainer callback with a real Trainer
# ----------------------------------------------------------------------------------------------------------------------


def _trainer(tiny_clip, tmp_path, callback, **arg_overrides):
    from transformers import Trainer, TrainingArguments

    model, tokenizer, image_processor = tiny_clip
    images, _ = _images()
    tokens = tokenizer(
        ["red square", "green square", "blue square", "red", "green", "blue"],
        padding="max_length",
        max_length=6,
        return_tensors="pt",
    )
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    train = [
        {"input_ids": tokens["input_ids"][i], "attention_mask": tokens["attention_mask"][i], "pixel_values": pixels[i]}
        for i in range(6)
    ]

    def collate(rows):
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        return batch | {"return_loss": True}

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        save_strategy="no",
        disable_tqdm=True,
        **arg_overrides,
    )
    return Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=train, data_collator=collate, callbacks=[callback]
    )


def test_callback_logs_every_n_steps_through_the_trainer(tiny_clip, tmp_path):
    _, tokenizer, image_processor = tiny_clip
    images, labels = _images()
    callback = ZeroShotEvalCallback(
        (tokenizer, image_processor),
        zero_shot_dataset=[{"image": i, "label": lab} for i, lab in zip(images, labels)],
        class_names=["red", "green", "blue"],
        templates=("the {} square",),
        retrieval_dataset=[{"image": i, "text": t} for i, t in zip(images[:3], ["red", "green", "blue"])],
        eval_steps=2,
        run_on_evaluate=False,
    )
    trainer = _trainer(tiny_clip, tmp_path, callback)
    callback.attach(trainer)
    assert trainer.callback_handler.callbacks.count(callback) == 1
    trainer.train()
    entries = [e for e in trainer.state.log_history if "eval_zeroshot_top1" in e]
    assert [e["step"] for e in entries] == [2, 4]
    for entry in entries:
        assert 0.0 <= entry["eval_zeroshot_top1"] <= 1.0
        assert "eval_retrieval_image_to_text_recall@1" in entry and "epoch" in entry
        assert "eval_zeroshot_per_class_accuracy" not in entry  # only scalars are logged
        assert "eval_zeroshot_num_samples" not in entry and entry["eval_zeroshot_num_skipped"] == 0
    assert trainer.model.training  # evaluation put the model back into training mode


def test_callback_merges_metrics_into_trainer_evaluate(tiny_clip, tmp_path):
    _, tokenizer, image_processor = tiny_clip
    images, labels = _images()
    callback = ZeroShotEvalCallback(
        (tokenizer, image_processor),
        zero_shot_dataset=[{"image": i, "label": lab} for i, lab in zip(images, labels)],
        class_names=["red", "green", "blue"],
        templates=("the {} square",),
        metric_prefix="val",
    )
    trainer = _trainer(tiny_clip, tmp_path, callback)  # not attached: entries go straight into log_history
    metrics = trainer.evaluate()
    assert "val_zeroshot_top1" in metrics and "eval_loss" in metrics
    logged = [e for e in trainer.state.log_history if "val_zeroshot_top1" in e]
    assert len(logged) == 1 and logged[0]["val_zeroshot_top1"] == metrics["val_zeroshot_top1"]
    assert logged[0]["step"] == 0


def test_callback_requires_a_dataset():
    with pytest.raises(ValueError, match="zero_shot_dataset and/or a retrieval_dataset"):
        ZeroShotEvalCallback(None)


# ----------------------------------------------------------------------------------------------------------------------
# command line on a saved tiny MS-CLIP checkpoint
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny_msclip(tmp_path_factory, msclip_tokenizer_dir):
    """A randomly initialised msclip-s-tiny model and its processor, saved like a real checkpoint."""
    from modeling_msclip import MSClipConfig, MSClipModel
    from modeling_msclip.image_processing_msclip import MSClipImageProcessor
    from modeling_msclip.processing_msclip import MSClipProcessor
    from modeling_msclip.tokenization_msclip import MSClipTokenizer

    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-s-tiny")
    size = config.vision_config.image_size
    processor = MSClipProcessor(
        image_processor=MSClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=MSClipTokenizer.from_pretrained(msclip_tokenizer_dir),
    )
    directory = tmp_path_factory.mktemp("tiny_msclip")
    MSClipModel(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_cli_zero_shot_and_retrieval_on_saved_msclip(saved_tiny_msclip, tmp_path):
    images, labels = _images()
    names = ["red", "green", "blue"]
    for index, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "zs" / names[label]).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "zs" / names[label] / f"{index}.png")
    (tmp_path / "ret").mkdir()
    with open(tmp_path / "ret" / "metadata.jsonl", "w") as handle:
        for index, image in enumerate(images[:3]):
            image.save(tmp_path / "ret" / f"{index}.png")
            handle.write(json.dumps({"file_name": f"{index}.png", "text": [f"a {names[index]} square", "a thing"]}))
            handle.write("\n")
    output = tmp_path / "results.json"
    argv = [
        "--model",
        str(saved_tiny_msclip),
        "--zero-shot-data",
        str(tmp_path / "zs"),
        "--retrieval-data",
        str(tmp_path / "ret"),
        "--output",
        str(output),
        "--batch-size",
        "4",
    ]
    results = run_evaluation.main(argv)
    written = json.loads(output.read_text())
    assert written["zeroshot"]["num_samples"] == 6 and written["zeroshot"]["num_classes"] == 3
    assert written["retrieval"]["num_texts"] == 6 and written["retrieval"]["num_images"] == 3
    assert written["zeroshot"]["top1"] == pytest.approx(results["zeroshot"]["top1"])
    # The CLI equals the Python API on the same data.
    model, processor = load_model_and_processor(saved_tiny_msclip, "cpu")
    direct = evaluate_zero_shot(model, processor, load_eval_dataset(tmp_path / "zs"))
    assert direct["top1"] == pytest.approx(written["zeroshot"]["top1"])
    with pytest.raises(SystemExit):  # an existing result file is not replaced without --overwrite
        run_evaluation.main(argv)
