"""Tests of the demo's shapes dataset (processing/shapes_dataset.py): captions that match the drawn pixels,
deterministic splits with held-out colour x shape pairs, both on-disk formats and their command line, and the
zero-shot tasks. Its evaluation is checked in test_evaluation_scripts.py.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from modeling_msclip.collators_msclip import ImageTextCollator
from modeling_msclip.data_msclip import load_image_text_dataset
from modeling_msclip.records_msclip import decode_image
from modeling_msclip.tokenization_msclip import MSClipTokenizer
from modeling_msclip.transforms_msclip import TrainImageTransform
from processing import make_shapes_dataset
from processing.shapes_dataset import (
    COLORS,
    CROSS_ARM_RATIO,
    CROSS_HALF_WIDTH,
    DEFAULT_HELD_OUT_PAIRS,
    SHAPES,
    SIZES,
    SQUARE_HALF_SIDE,
    STAR_INNER_RATIO,
    STAR_OUTER_RADIUS,
    TRIANGLE_CIRCUMRADIUS,
    ZERO_SHOT_TASKS,
    ShapesConfig,
    generate_examples,
    sample_scene,
    write_shapes_dataset,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def tokenizer(msclip_tokenizer_dir):
    return MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


def _expected_shape_signature(shape: str) -> tuple[float, float, float]:
    """(area / bounding-box area, vertical centroid offset / box height, box width / radius) from the geometry."""
    if shape == "circle":
        return math.pi / 4, 0.0, 2.0
    if shape == "square":
        return 1.0, 0.0, 2 * SQUARE_HALF_SIDE
    if shape == "triangle":  # apex up: the box spans R above the centre to R/2 below it
        return 0.5, 1 / 6, math.sqrt(3) * TRIANGLE_CIRCUMRADIUS
    if shape == "star":
        sin36, sin72, cos36 = (math.sin(math.radians(36)), math.sin(math.radians(72)), math.cos(math.radians(36)))
        area = 5 * STAR_INNER_RATIO * sin36  # ten triangles of sides R and kR at 36 degrees, per R^2
        box_height = 1 + cos36
        return area / (2 * sin72 * box_height), (1 - box_height / 2) / box_height, 2 * sin72 * STAR_OUTER_RADIUS
    a = CROSS_ARM_RATIO
    return 2 * a - a * a, 0.0, 2 * CROSS_HALF_WIDTH


def _coverage(pixels: np.ndarray, color_name: str, region: np.ndarray) -> np.ndarray:
    """Fraction of each pixel covered by the object of that colour (0 = background, 1 = object), in `region`."""
    background = np.median(pixels[0], axis=0)  # objects never touch the border
    palette = np.array(COLORS[color_name], dtype=np.float64)
    rough = (np.linalg.norm(pixels - palette, axis=-1) < np.linalg.norm(palette - background) / 2) & region
    color = np.median(pixels[rough], axis=0)  # the object's own (jittered) colour
    direction = color - background
    coverage = np.clip((pixels - background) @ direction / (direction @ direction), 0, 1)
    ys, xs = np.nonzero(rough)
    near = np.zeros_like(region)
    near[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3] = True
    coverage = coverage * (near & region)
    coverage[coverage < 0.1] = 0.0  # background noise
    return coverage


def _measure_objects(image: Image.Image, row: dict) -> list[dict]:
    """Find every described object in the pixels: its colour, horizontal position, size and shape."""
    pixels = np.asarray(image, dtype=np.float64)
    side = pixels.shape[0]
    found = []
    for obj in row["objects"]:
        region = np.ones((side, side), dtype=bool)
        if row["num_objects"] == 2:  # the two objects sit in different halves
            region[:, side // 2 :] = obj["position"] == "right"
            region[:, : side // 2] = obj["position"] == "left"
        coverage = _coverage(pixels, obj["color"], region)
        mean_rgb = (pixels * coverage[..., None]).sum(axis=(0, 1)) / coverage.sum()
        nearest = min(COLORS, key=lambda name: np.linalg.norm(mean_rgb - np.array(COLORS[name])))
        # Sub-pixel extents: the sum over columns (rows) of the largest coverage in each.
        column_profile, row_profile = coverage.max(axis=0), coverage.max(axis=1)
        width, height = column_profile.sum(), row_profile.sum()
        rows = np.nonzero(row_profile)[0]
        top, bottom = rows[0] + 1 - row_profile[rows[0]], rows[-1] + row_profile[rows[-1]]
        centroid_y = (coverage.sum(axis=1) * (np.arange(side) + 0.5)).sum() / coverage.sum()
        centroid_x = (coverage.sum(axis=0) * (np.arange(side) + 0.5)).sum() / coverage.sum()
        fill = coverage.sum() / (width * height)
        offset = (centroid_y - (top + bottom) / 2) / height

        def distance(shape, fill=fill, offset=offset):
            expected_fill, expected_offset, _ = _expected_shape_signature(shape)
            return abs(expected_fill - fill) + abs(expected_offset - offset)

        shape = min(SHAPES, key=distance)
        radius = width / _expected_shape_signature(shape)[2] / side
        size = min(SIZES, key=lambda name: abs(SIZES[name] - radius))
        found.append({"color": nearest, "x": centroid_x / side, "shape": shape, "size": size})
    return found


def test_shapes_captions_match_the_drawn_pixels():
    config = ShapesConfig(image_size=128, two_object_probability=0.5)
    for image, row in generate_examples("train", 40, config):
        measured = _measure_objects(image, row)
        for obj, seen in zip(row["objects"], measured):
            assert seen["color"] == obj["color"] and seen["shape"] == obj["shape"] and seen["size"] == obj["size"]
            assert obj["color"] in row["text"] and obj["shape"] in row["text"]
        if row["num_objects"] == 1:
            low, high = {"left": (0.15, 0.35), "center": (0.4, 0.6), "right": (0.65, 0.85)}[row["position"]]
            assert low < measured[0]["x"] < high
            assert f"{row['color']} {row['shape']}" in row["text"]
            if any(word in row["text"] for word in ("left", "middle", "right")):
                expected = {"left": "on the left", "center": "in the middle", "right": "on the right"}
                assert row["text"].endswith(expected[row["position"]])
        else:
            assert measured[0]["x"] < 0.5 < measured[1]["x"]
            left, right = (f"{o['color']} {o['shape']}" for o in row["objects"])
            text = row["text"]
            if "to the left of" in text or " and " in text:
                assert text.index(left) < text.index(right)
            else:
                assert "to the right of" in text and text.index(right) < text.index(left)


def test_shapes_splits_are_deterministic_and_hold_out_pairs():
    config = ShapesConfig()
    assert sample_scene("train", 7, config) == sample_scene("train", 7, ShapesConfig())
    assert sample_scene("train", 7, config) != sample_scene("train", 7, ShapesConfig(seed=1))
    first = [np.asarray(image) for image, _ in generate_examples("validation", 3, config)]
    again = [np.asarray(image) for image, _ in generate_examples("validation", 3, config)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    held_out = set(DEFAULT_HELD_OUT_PAIRS)
    for split in ("train", "validation"):
        for index in range(400):
            scene = sample_scene(split, index, config)
            assert not any((obj.shape, obj.color) in held_out for obj in scene.objects)
    test_pairs = [
        (scene.objects[0].shape, scene.objects[0].color, scene.held_out_pair)
        for scene in (sample_scene("test", index, config) for index in range(200))
    ]
    assert all((shape, color) in held_out for shape, color, flag in test_pairs if flag)
    assert all((shape, color) not in held_out for shape, color, flag in test_pairs if not flag)
    assert 60 < sum(flag for *_, flag in test_pairs) < 140
    # Every shape and every colour still appears in training.
    assert {s for s, _ in config.seen_pairs()} == set(SHAPES) and {c for _, c in config.seen_pairs()} == set(COLORS)
    with pytest.raises(ValueError, match="Held-out pair"):
        ShapesConfig(held_out_pairs=(("hexagon", "red"),))


def test_shapes_dataset_on_disk_in_both_formats(tmp_path, tokenizer, cache_dir):
    config = ShapesConfig(image_size=32)
    folder = write_shapes_dataset(tmp_path / "folder", num_train=6, num_validation=0, num_test=5, config=config)
    shards = write_shapes_dataset(
        tmp_path / "shards",
        num_train=6,
        num_validation=0,
        num_test=5,
        config=config,
        data_format="webdataset",
        samples_per_shard=4,
    )
    assert sorted(p.name for p in (shards / "train").iterdir()) == ["000000.tar", "000001.tar"]
    info = json.loads((folder / "shapes_info.json").read_text())
    assert info["splits"] == {"train": 6, "test": 5} and info["held_out_pairs"][0] == ["circle", "blue"]
    test_split = load_image_text_dataset(folder, split="test", cache_dir=cache_dir)
    test_shards = load_image_text_dataset(shards, split="test", cache_dir=cache_dir)
    assert test_split["text"] == test_shards["text"]
    assert [record["shape_label"] for record in test_shards["json"]] == test_split["shape_label"]
    for record in test_split:
        image = decode_image(record["image"])
        assert image.size == (32, 32)
        assert ZERO_SHOT_TASKS["color_shape"].class_names[record["color_shape_label"]] == (
            f"{record['color']} {record['shape']}"
        )
        assert SHAPES[record["shape_label"]] == record["shape"]
    batch = ImageTextCollator(tokenizer, TrainImageTransform(32, MEAN, STD))(
        list(load_image_text_dataset(folder, split="train", cache_dir=cache_dir))
    )
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    script = make_shapes_dataset
    assert script.main(["--output", str(folder), "--num-train", "2", "--num-test", "1"]) == 2
    (folder / "mine.txt").write_text("keep me")
    arguments = ["--output", str(folder), "--num-train", "2", "--num-validation", "1", "--num-test", "1"]
    assert script.main([*arguments, "--overwrite"]) == 0
    assert len(list((folder / "train").glob("*.png"))) == 2 and (folder / "mine.txt").read_text() == "keep me"


def test_zero_shot_tasks_are_well_formed():
    for name, task in ZERO_SHOT_TASKS.items():
        assert task.label_column == f"{name}_label"
        for index in range(len(task.class_names)):
            prompts = task.prompts(index)
            assert len(prompts) == len(task.templates) and all("{" not in p for p in prompts)
            assert all(task.class_names[index] in prompt for prompt in prompts)
            assert not any(" a orange" in prompt or prompt.startswith("a orange") for prompt in prompts)


def test_the_installed_package_needs_no_repository_folder(tmp_path):
    """The shapes data is demo code beside the scripts: every module of the package imports from a folder where
    neither processing/ nor training/ can be found, and leaves neither imported."""
    script = (
        "import importlib, importlib.util, pkgutil, sys\n"
        "import modeling_msclip\n"
        "assert importlib.util.find_spec('processing') is None and importlib.util.find_spec('training') is None\n"
        "names = [info.name for info in pkgutil.iter_modules(modeling_msclip.__path__)]\n"
        "for name in names:\n"
        "    importlib.import_module(f'modeling_msclip.{name}')\n"
        "print(sorted(names))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('processing', 'training')))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    modules, repository_modules = completed.stdout.strip().splitlines()[-2:]
    assert "'evaluation_msclip'" in modules and "shapes_dataset" not in modules
    assert repository_modules == "[]"
