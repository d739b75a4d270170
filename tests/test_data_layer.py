"""The one data layer (data_msclip.load_dataset / detect_format / prepare_labels) as evaluation, fine-tuning and
pre-training see it, and the conversion of every PIL image mode to RGB.

Real files written with PIL into tmp_path, no mocks:

* evaluation (the zero-shot and linear-probe paths of training/run_evaluation.py, i.e. `run_evaluation.main`) on
  a ``metadata.jsonl`` + ``images/*.png`` folder with a label column gives the class count and the accuracy computed
  here by hand; the same layout without a label column is refused for classification with the columns named;
* a missing local path is a FileNotFoundError naming it (never a Hub download), class folders are refused for the
  image-text task ("no captions"), a folder that fits several formats is refused with the candidates listed, and an
  explicit format overrides detection;
* every mode (1, L, LA, P, PA, RGB, RGBA, CMYK, I;16 and its variants, I, F) decodes to the expected RGB values
  through `decode_image` and through `MSClipImageProcessor`.
"""

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale
from PIL import Image

from modeling_msclip import MSClipConfig, MSClipImageProcessor, MSClipModel, MSClipProcessor
from modeling_msclip import evaluation_msclip as ev
from modeling_msclip.data_msclip import (
    detect_format,
    load_dataset,
    load_image_text_dataset,
    looks_like_hub_id,
    prepare_labels,
)
from modeling_msclip.encoding_msclip import encode_images, load_model_and_processor
from modeling_msclip.finetuning_msclip import load_classification_dataset
from modeling_msclip.metrics_msclip import linear_probe
from modeling_msclip.records_msclip import decode_image
from modeling_msclip.tokenization_msclip import MSClipTokenizer
from training import run_evaluation

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
PER_CLASS = 4


def _noisy(rgb: tuple[int, int, int], seed: int, size: int = 40) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-25, 26, size=(size, size, 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8))


def write_images_and_metadata(root: Path, label_key: str | None = "kind") -> dict[str, str]:
    """``root/metadata.jsonl`` + ``root/images/<i>.png`` (the common layout); returns file name -> colour."""
    (root / "images").mkdir(parents=True)
    rows, truth = [], {}
    for index in range(PER_CLASS * len(COLOURS)):
        colour = list(COLOURS)[index % len(COLOURS)]
        name = f"{index:02d}.png"
        _noisy(COLOURS[colour], index).save(root / "images" / name)
        row = {"file_name": f"images/{name}", "text": f"a {colour} square"}
        if label_key:
            row[label_key] = colour
        rows.append(row)
        truth[name] = colour
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return truth


def write_class_folders(root: Path, names=("cat", "dog")) -> None:
    for index, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for number in range(2):
            _noisy((40 + 100 * index, 90, 90), 10 * index + number, size=12).save(root / name / f"{number}.png")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, msclip_tokenizer_dir) -> Path:
    """A random msclip-s-tiny MSClipModel with its processor, saved like a checkpoint."""
    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-s-tiny")
    size = config.vision_config.image_size
    folder = tmp_path_factory.mktemp("tiny_msclip")
    MSClipModel(config).save_pretrained(folder)
    MSClipProcessor(
        image_processor=MSClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=MSClipTokenizer.from_pretrained(msclip_tokenizer_dir),
    ).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on metadata.jsonl + images/
# ---------------------------------------------------------------------------------------------------------------


def _hand_zero_shot_top1(model, processor, images, labels, class_names) -> float:
    """Top-1 of the zero-shot classifier written out: mean of the unit prompt embeddings per class, cosine with the
    unit image embeddings; a hit needs the true class to score strictly above every other (ties count as misses)."""
    tokenizer = processor.tokenizer
    prompts = [template.format(name) for name in class_names for template in ev.DEFAULT_TEMPLATES]
    with torch.no_grad():
        text = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
    per_class = F.normalize(F.normalize(text, dim=-1).view(len(class_names), len(ev.DEFAULT_TEMPLATES), -1).mean(1))
    scores = F.normalize(image, dim=-1) @ per_class.T
    labels = torch.tensor(labels)
    true = scores[torch.arange(len(labels)), labels]
    others = scores.clone()
    others[torch.arange(len(labels)), labels] = -torch.inf
    return (true > others.max(dim=1).values).double().mean().item()


def test_evaluation_reads_metadata_and_images_folder_with_a_label_column(saved_model, tmp_path):
    truth = write_images_and_metadata(tmp_path / "data", label_key="kind")
    assert detect_format(tmp_path / "data") == "imagefolder"
    output = tmp_path / "results.json"
    argv = ["--model", str(saved_model), "--device", "cpu", "--batch-size", "5", "--label-column", "kind"]
    argv += ["--zero-shot-data", str(tmp_path / "data"), "--output", str(output)]
    argv += ["--linear-probe-train", str(tmp_path / "data"), "--linear-probe-test", str(tmp_path / "data")]
    results = run_evaluation.main(argv)
    assert json.loads(output.read_text())["zeroshot"]["top1"] == pytest.approx(results["zeroshot"]["top1"])

    class_names = sorted(COLOURS)  # string labels are encoded in sorted order
    zeroshot, probe = results["zeroshot"], results["linear_probe"]
    assert zeroshot["num_classes"] == 3 and zeroshot["num_samples"] == len(truth) and zeroshot["num_skipped"] == 0
    assert probe["num_classes"] == 3 and probe["num_test"] == len(truth)

    # The same numbers by hand, from the image files and the colours written into metadata.jsonl.
    model, processor = load_model_and_processor(saved_model, "cpu")
    names = sorted(truth)
    images = [Image.open(tmp_path / "data" / "images" / name).convert("RGB") for name in names]
    labels = [class_names.index(truth[name]) for name in names]
    expected_top1 = _hand_zero_shot_top1(model, processor, images, labels, class_names)
    assert zeroshot["top1"] == pytest.approx(expected_top1, abs=1e-9)

    # The loaded records carry the labels of their own files, and the probe equals `linear_probe` on them.
    dataset = ev.load_eval_dataset(tmp_path / "data", purpose="classification", label_column="kind")
    assert ev.class_names_from_dataset(dataset) == class_names
    assert [class_names[label] for label in dataset["label"]] == [
        truth[Path(record["image"]["path"]).name] for record in dataset
    ]
    images = [decode_image(record["image"]) for record in dataset]
    features = encode_images(model, processor.image_processor, images, batch_size=5)
    by_hand = linear_probe(features, torch.tensor(dataset["label"]), features, torch.tensor(dataset["label"]))
    assert probe["accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-9)
    assert probe["mean_per_class_recall"] == pytest.approx(by_hand["mean_per_class_recall"], abs=1e-9)

    # A column named "label" is found without --label-column; its text values name the classes.
    write_images_and_metadata(tmp_path / "labelled", label_key="label")
    labelled = ev.load_eval_dataset(tmp_path / "labelled", purpose="classification", require_class_names=True)
    assert ev.class_names_from_dataset(labelled) == class_names and len(labelled) == len(truth)


def test_classification_without_a_label_column_is_refused(saved_model, tmp_path):
    write_images_and_metadata(tmp_path / "data", label_key=None)
    columns = r"\['image', 'text'\]"
    argv = ["--model", str(saved_model), "--device", "cpu"]
    with pytest.raises(ValueError, match=f"no label column.*{columns}.*label_column="):
        run_evaluation.main([*argv, "--zero-shot-data", str(tmp_path / "data")])
    with pytest.raises(ValueError, match="no label column"):
        run_evaluation.main(
            [*argv, "--linear-probe-train", str(tmp_path / "data"), "--linear-probe-test", str(tmp_path / "data")]
        )
    with pytest.raises(ValueError, match="no label column") as refused:
        load_classification_dataset(tmp_path / "data")
    assert "classfolder" not in str(refused.value)  # one sub-folder (images/) is no set of classes
    with pytest.raises(ValueError, match=r"The label column 'kind' is not among .*'image', 'text'"):
        load_dataset(tmp_path / "data", task="classification", label_column="kind")
    # The same folder is fine image-text data (retrieval, pre-training): its captions are read.
    captions = ev.load_eval_dataset(tmp_path / "data", purpose="retrieval")
    assert len(captions) == PER_CLASS * len(COLOURS) and captions[0]["text"].startswith("a ")


def test_class_sub_folders_next_to_metadata_need_the_classfolder_format(tmp_path):
    # The Fashion-MNIST tree (processing/fashion_mnist.py): <split>/<class>/*.png next to <split>/metadata.jsonl.
    for split in ("train", "test"):
        write_class_folders(tmp_path / "fm" / split, names=("ankle_boot", "bag", "coat"))
        rows = [
            {"file_name": f"{name}/{number}.png", "text": f"a photo of a {name}", "class_name": name}
            for name in ("ankle_boot", "bag", "coat")
            for number in range(2)
        ]
        (tmp_path / "fm" / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert detect_format(tmp_path / "fm") == "imagefolder"
    captions = load_image_text_dataset(tmp_path / "fm", split="test")
    assert sorted(set(captions["text"])) == ["a photo of a ankle_boot", "a photo of a bag", "a photo of a coat"]
    message = r"no label column.*'class_name'.*ankle_boot, bag, coat.*format='classfolder'"
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path / "fm", task="classification", split="test")
    dataset, names = load_classification_dataset(tmp_path / "fm", split="test", format="classfolder")
    assert names == ["ankle boot", "bag", "coat"] and len(dataset) == 6
    assert all(names[r["label"]] == Path(r["image"]["path"]).parent.name.replace("_", " ") for r in dataset)
    # Or name the column of the metadata that holds the class.
    dataset, names = load_classification_dataset(tmp_path / "fm", split="test", label_column="class_name")
    assert names == ["ankle boot", "bag", "coat"] and len(dataset) == 6


# ---------------------------------------------------------------------------------------------------------------
# Paths, Hub ids, layouts and explicit formats
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["data/my_pairs.jsonl", "data/my_pairs", "./pairs", "pairs.csv", "a/b/c.tar"])
def test_a_missing_local_path_is_file_not_found_naming_it(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    loaders = [
        lambda: load_dataset(source),
        lambda: load_image_text_dataset(source),
        lambda: load_classification_dataset(source),
        lambda: ev.load_eval_dataset(source, purpose="classification"),
        lambda: ev.load_eval_dataset(source),
    ]
    for load in loaders:
        with pytest.raises(FileNotFoundError, match=f"No such file or folder: '{source}'"):
            load()
    assert not looks_like_hub_id(source)


def test_hub_ids_are_only_name_or_owner_slash_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub_id in ("fashion_mnist", "owner/name", "owner/name-v2"):
        assert looks_like_hub_id(hub_id) and detect_format(hub_id) == "hub"
    for local in ("owner/name.jsonl", "a/b/c", "/abs/name", "./name", "../name", "name.parquet", "x y"):
        assert not looks_like_hub_id(local)
    (tmp_path / "data").mkdir()
    assert not looks_like_hub_id("data/pairs")  # data/ is a local folder: a typo of a file in it, not a Hub id
    with pytest.raises(FileNotFoundError, match="'/abs/missing/pairs'"):
        detect_format("/abs/missing/pairs")


def test_class_folders_carry_no_captions(tmp_path):
    write_class_folders(tmp_path / "classes")
    assert detect_format(tmp_path / "classes") == "classfolder"
    for format in ("auto", "classfolder", "imagefolder"):
        with pytest.raises(ValueError, match="class folders carry no captions"):
            load_image_text_dataset(tmp_path / "classes", format=format)
    with pytest.raises(ValueError, match="class folders carry no captions"):
        ev.load_eval_dataset(tmp_path / "classes", purpose="retrieval")
    # Pre-training (training/run_pretrain.py build_datasets) says so at load time instead of sampling an empty dataset.
    from modeling_msclip.records_msclip import DataStats
    from training.run_pretrain import DataArguments, build_datasets

    with pytest.raises(ValueError, match="class folders carry no captions"):
        build_datasets(DataArguments(train_data=str(tmp_path / "classes")), DataStats())
    # For classification they are what they look like.
    dataset, names = prepare_labels(load_dataset(tmp_path / "classes", task="classification"))
    assert names == ["cat", "dog"] and sorted(dataset["label"]) == [0, 0, 1, 1]
    assert ev.load_eval_dataset(tmp_path / "classes").features["label"].names == ["cat", "dog"]  # auto purpose


def _write_shard(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for index in range(count):
            for suffix, data in ((".png", _png_bytes(_noisy((10, 20, 30), index, size=8))), (".txt", b"a caption")):
                info = tarfile.TarInfo(f"{index:06d}{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_a_folder_that_fits_several_formats_is_refused_listing_them(tmp_path):
    root = tmp_path / "mixed"
    write_images_and_metadata(root, label_key="kind")
    _write_shard(root / "shards" / "000000.tar", 3)
    with pytest.raises(ValueError, match=r"fits several formats: format='webdataset' \(shards/000000.tar\); "):
        detect_format(root)
    with pytest.raises(ValueError, match=r"format='imagefolder' \(metadata.jsonl\)"):
        load_dataset(root)
    # Explicit formats override detection.
    assert len(load_dataset(root, format="imagefolder")) == PER_CLASS * len(COLOURS)
    assert load_dataset(root / "shards", format="webdataset")["text"] == ["a caption"] * 3
    labelled, names = prepare_labels(
        load_dataset(root, format="imagefolder", task="classification", label_column="kind")
    )
    assert names == sorted(COLOURS)

    # Shards next to class folders: the same refusal.
    write_class_folders(tmp_path / "both")
    _write_shard(tmp_path / "both" / "000000.tar", 2)
    with pytest.raises(ValueError, match=r"format='webdataset' \(000000.tar\); format='classfolder' \(cat/, dog/\)"):
        detect_format(tmp_path / "both")
    assert len(load_dataset(tmp_path / "both", format="webdataset")) == 2
    assert len(load_dataset(tmp_path / "both", format="classfolder", task="classification")) == 4

    # A folder that fits none names what it lacks; one image sub-folder without metadata is no set of classes.
    (tmp_path / "loose" / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "loose" / "images" / "0.png")
    with pytest.raises(ValueError, match=r"one image sub-folder \(images/\) and no metadata file"):
        detect_format(tmp_path / "loose")


def test_the_split_folder_that_is_read_is_the_one_examined(tmp_path):
    write_images_and_metadata(tmp_path / "data" / "train", label_key="kind")
    write_class_folders(tmp_path / "data" / "test")
    assert detect_format(tmp_path / "data", split="train") == "imagefolder"
    assert detect_format(tmp_path / "data", split="test") == "classfolder"
    dataset, names = prepare_labels(load_dataset(tmp_path / "data", split="test", task="classification"))
    assert names == ["cat", "dog"] and len(dataset) == 4
    assert ev.load_eval_dataset(tmp_path / "data", split="test").features["label"].names == ["cat", "dog"]


def test_explicit_format_reads_a_file_whatever_its_name(tmp_path):
    (tmp_path / "images").mkdir()
    _noisy((1, 2, 3), 0, size=8).save(tmp_path / "images" / "0.png")
    (tmp_path / "pairs.txt").write_text(json.dumps({"image": "images/0.png", "caption": "a thing"}) + "\n")
    with pytest.raises(ValueError, match="Cannot tell the format of the file"):
        detect_format(tmp_path / "pairs.txt")
    dataset = load_dataset(tmp_path / "pairs.txt", format="jsonl")
    assert dataset[0]["text"] == "a thing" and dataset[0]["image"]["path"] == str(tmp_path / "images" / "0.png")
    # Parquet tables are a format of their own, for both tasks.
    datasets.Dataset.from_dict({"filepath": ["images/0.png"], "label": ["x"]}).to_parquet(tmp_path / "t.parquet")
    assert detect_format(tmp_path / "t.parquet") == "parquet"
    table, names = prepare_labels(load_dataset(tmp_path / "t.parquet", task="classification"))
    assert names == ["x"] and decode_image(table[0]["image"]).size == (8, 8)


# ---------------------------------------------------------------------------------------------------------------
# Image modes
# ---------------------------------------------------------------------------------------------------------------

WIDTH = 256
GRADIENT_8 = np.arange(WIDTH, dtype=np.float64)  # 0..255


def _grey(values: np.ndarray) -> np.ndarray:
    """``[2, W]`` grey levels -> the ``[2, W, 3]`` RGB they must become."""
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=-1)


def _two_rows(row: np.ndarray, dtype) -> np.ndarray:
    return np.stack([row, row[::-1]]).astype(dtype)


def _mode_cases() -> list[tuple[str, Image.Image, np.ndarray, str | None]]:
    """(name, image of that mode, expected RGB [2, W, 3] as floats, file format to round-trip it through)."""
    cases = []
    rng = np.random.default_rng(0)
    ones = _two_rows(np.arange(WIDTH) % 2 == 0, bool)
    cases.append(("1", Image.fromarray(ones), _grey(ones * 255.0), "PNG"))
    grey = _two_rows(GRADIENT_8, np.uint8)
    cases.append(("L", Image.fromarray(grey), _grey(grey), "PNG"))
    alpha = _two_rows(np.linspace(0, 255, WIDTH).round(), np.uint8)
    la = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    opacity = alpha / 255.0
    cases.append(("LA", la, _grey(grey * opacity + 255.0 * (1 - opacity)), "PNG"))
    palette = rng.integers(0, 256, size=(256, 3))
    indices = _two_rows(np.arange(WIDTH), np.uint8)
    p = Image.frombytes("P", (WIDTH, 2), indices.tobytes())
    p.putpalette(palette.astype(np.uint8).flatten().tolist())
    cases.append(("P", p, palette[indices].astype(np.float64), "PNG"))
    transparent = p.copy()
    transparent.info["transparency"] = 7
    expected = palette[indices].astype(np.float64)
    expected[indices == 7] = 255.0
    cases.append(("P+transparency", transparent, expected, "PNG"))
    pa = p.convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    composite = palette[indices] * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0)
    cases.append(("PA", pa, composite, None))
    rgb = rng.integers(0, 256, size=(2, WIDTH, 3)).astype(np.uint8)
    cases.append(("RGB", Image.fromarray(rgb), rgb.astype(np.float64), "PNG"))
    rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1))
    over_white = rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0)
    cases.append(("RGBA", rgba, over_white, "PNG"))
    cmyk_values = np.zeros((2, WIDTH, 4), dtype=np.uint8)
    cmyk_values[0, :, 0] = 255  # pure cyan
    cmyk_values[1, : WIDTH // 2, 3] = 255  # black, then white
    expected = np.full((2, WIDTH, 3), 255.0)
    expected[0, :, 0] = 0.0
    expected[1, : WIDTH // 2] = 0.0
    cases.append(("CMYK", Image.frombytes("CMYK", (WIDTH, 2), cmyk_values.tobytes()), expected, "TIFF"))
    # 16 bits: a 0..65535 gradient must span 0..255 (PIL's own convert("RGB") clips it to nearly all white).
    sixteen = _two_rows(np.linspace(0, 65535, WIDTH).round(), np.uint16)
    expected_16 = _grey(sixteen * 255.0 / 65535.0)
    cases.append(("I;16", Image.fromarray(sixteen), expected_16, "PNG"))
    big_endian = Image.frombytes("I;16B", (WIDTH, 2), sixteen.astype(">u2").tobytes())
    cases.append(("I;16B", big_endian, expected_16, "TIFF"))
    cases.append(("I;16L", Image.frombytes("I;16L", (WIDTH, 2), sixteen.astype("<u2").tobytes()), expected_16, None))
    # 32-bit integers: the 16-bit range when every value lies in 0..65535, else min-max.
    cases.append(("I (16-bit range)", Image.fromarray(sixteen.astype(np.int32)), expected_16, "TIFF"))
    wide = _two_rows(np.linspace(-70000, 130000, WIDTH).round(), np.int32)
    cases.append(("I (min-max)", Image.fromarray(wide), _grey((wide + 70000) * 255.0 / 200000.0), "TIFF"))
    # Floats: [0, 1] scaled by 255, else min-max.
    unit = _two_rows(np.linspace(0.0, 1.0, WIDTH), np.float32)
    cases.append(("F ([0, 1])", Image.fromarray(unit), _grey(unit.astype(np.float64) * 255.0), "TIFF"))
    spread = _two_rows(np.linspace(-3.0, 5.0, WIDTH), np.float32)
    minmax = (spread.astype(np.float64) + 3.0) * 255.0 / 8.0
    cases.append(("F (min-max)", Image.fromarray(spread), _grey(minmax), "TIFF"))
    return cases


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("name, image, expected, file_format", MODE_CASES, ids=[case[0] for case in MODE_CASES])
def test_every_image_mode_becomes_the_expected_rgb(tmp_path, name, image, expected, file_format):
    mode = name.split(" ")[0].split("+")[0]
    assert image.mode == mode
    # Rounded to 8 bits (and, with transparency, PIL's integer compositing): at most one grey level off.
    tolerance = (1.0 if "A" in mode or "transparency" in name else 0.5) / 255 + 1e-9
    sources = {"PIL image": image}
    if file_format is not None:
        path = tmp_path / f"image.{file_format.lower()}"
        image.save(path, format=file_format)
        assert Image.open(path).mode == mode  # the file holds the mode under test
        sources.update({"file": str(path), "bytes": {"bytes": path.read_bytes(), "path": None}})
    processor = MSClipImageProcessor(do_resize=False, do_center_crop=False, do_normalize=False)
    for source, value in sources.items():
        decoded = decode_image(value)
        assert decoded.mode == "RGB" and decoded.size == (WIDTH, 2)
        assert_close_to_scale(np.asarray(decoded), expected, tolerance, f"{name} via decode_image({source})")
    # The processor converts the image itself (no decode_image before it) to the same pixels.
    pixels = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) * 255.0
    assert_close_to_scale(pixels, expected, tolerance + 1e-5, f"{name} via MSClipImageProcessor")
    assert_close_to_scale(pixels, np.asarray(decode_image(image), dtype=np.float64), 1e-5, f"{name}: both agree")
    # With its default resize / crop / normalisation the processor also sees what training decodes.
    default = MSClipImageProcessor.from_preset("msclip", image_size=32)
    direct = default(images=image, return_tensors="np")["pixel_values"]
    decoded_first = default(images=decode_image(image), return_tensors="np")["pixel_values"]
    assert_close_to_scale(direct, decoded_first, 1e-6, f"{name}: processor on the raw and the decoded image")


def test_sixteen_bit_is_not_white_through_the_eval_transform():
    from modeling_msclip.transforms_msclip import ImageProcessorTransform

    sixteen = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    processor = MSClipImageProcessor.from_preset("msclip", image_size=32)
    pixels = ImageProcessorTransform(processor)(decode_image(Image.fromarray(sixteen)))
    reference = processor(images=Image.fromarray((sixteen / 257).round().astype(np.uint8)), return_tensors="pt")
    assert_close_to_scale(pixels, reference["pixel_values"][0], 0.02, "16-bit gradient after the eval transform")
    assert float(pixels.std()) > 0.5  # a gradient, not a constant white image
