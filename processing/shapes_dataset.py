"""The demo's dataset: procedurally drawn shapes with compositional captions, and its evaluation.

Every image shows one or two flat shapes on a noisy grey background; its caption names what was drawn, e.g.
"a large red circle on the left" or "a small blue star to the left of an orange cross". Nothing is downloaded: the
data is generated from a seed, sample by sample (sample ``i`` of a split depends only on the seed, the split and
``i``), so any machine makes the same dataset.

Splits:

* ``train``: one or two objects, never using a held-out colour x shape pair;
* ``validation``: the same distribution as train (in-distribution loss and retrieval);
* ``test``: one object per image, about half of them in a held-out colour x shape pair (column ``held_out_pair``),
  so zero-shot accuracy on combinations never seen in training can be compared with seen ones.

`ZERO_SHOT_TASKS` lists classification tasks (shape, colour, colour+shape, size) with class names, prompt templates
and the label column of the test split. `write_shapes_dataset` writes the data as an image folder with
``metadata.jsonl`` (or as webdataset shards), so the demo reads it through the same loaders as user data.
`evaluate_shapes_dataset` runs every task (and retrieval) with the library's generic evaluation functions.

This is demo and test data, not part of the installed ``modeling_msclip`` package: the demo
(``python -m training.demo``), ``processing/make_shapes_dataset.py``, ``training/run_evaluation.py --shapes_data``,
the benchmarks and the tests import it from the repository.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from modeling_msclip.webdataset_msclip import WebDatasetShardWriter, prepare_output_dir

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
COLOR_NAMES = tuple(COLORS)
# Object radius as a fraction of the image side.
SIZES = {"small": 0.10, "large": 0.18}
SIZE_NAMES = tuple(SIZES)
# Horizontal centre of a lone object as a fraction of the image side.
POSITIONS = {"left": 0.25, "center": 0.5, "right": 0.75}
POSITION_NAMES = tuple(POSITIONS)
POSITION_PHRASES = {"left": "on the left", "center": "in the middle", "right": "on the right"}
SPLITS = ("train", "validation", "test")
_SPLIT_IDS = {name: index for index, name in enumerate(SPLITS)}

# Shape geometry relative to the object's radius r (chosen so all shapes look about equally big).
SQUARE_HALF_SIDE = 0.85
TRIANGLE_CIRCUMRADIUS = 1.15  # equilateral, pointing up
STAR_OUTER_RADIUS = 1.2  # five points, pointing up
STAR_INNER_RATIO = 0.45  # inner radius / outer radius
CROSS_HALF_WIDTH = 0.95  # a plus sign
CROSS_ARM_RATIO = 0.35  # half the arm thickness / half the width
MAX_EXTENT = max(STAR_OUTER_RADIUS, TRIANGLE_CIRCUMRADIUS, CROSS_HALF_WIDTH, SQUARE_HALF_SIDE, 1.0)

# One held-out colour per shape, all different, so every shape and every colour is still seen in training.
DEFAULT_HELD_OUT_PAIRS = (
    ("circle", "blue"),
    ("square", "yellow"),
    ("triangle", "purple"),
    ("star", "red"),
    ("cross", "green"),
)

_POSITION_JITTER = 0.03
_SIZE_JITTER = 0.08
_COLOR_JITTER = 12
_NOISE = 5
_SUPERSAMPLE = 4


def article(phrase: str) -> str:
    """Return ``phrase`` with "a" or "an" in front (only vowel-initial words appear here)."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class ShapesConfig:
    """Generation settings; the same settings and seed always give the same dataset."""

    image_size: int = 64
    seed: int = 0
    two_object_probability: float = 0.3
    held_out_pairs: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT_PAIRS
    held_out_test_fraction: float = 0.5
    size_drop_probability: float = 0.25
    position_drop_probability: float = 0.15
    # Share of object phrases that leave out the colour ("a large circle"); 0 draws exactly the captions it always
    # drew (no extra random number is taken).
    color_drop_probability: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size < 32:  # two large objects side by side need about 32 pixels
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        probabilities = (
            "two_object_probability",
            "held_out_test_fraction",
            "size_drop_probability",
            "position_drop_probability",
            "color_drop_probability",
        )
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        pairs = tuple((str(shape), str(color)) for shape, color in self.held_out_pairs)
        for shape, color in pairs:
            if shape not in SHAPES or color not in COLORS:
                raise ValueError(f"Held-out pair ({shape!r}, {color!r}) is not a known (shape, colour)")
        if len(set(pairs)) == len(SHAPES) * len(COLORS):
            raise ValueError("At least one colour x shape pair must stay in training")
        object.__setattr__(self, "held_out_pairs", pairs)

    def seen_pairs(self) -> list[tuple[str, str]]:
        """The (shape, colour) pairs that training images may use."""
        held_out = set(self.held_out_pairs)
        return [(shape, color) for shape in SHAPES for color in COLORS if (shape, color) not in held_out]


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; coordinates are in pixels of the final image."""

    shape: str
    color: str
    size: str
    position: str
    center_x: float
    center_y: float
    radius: float
    rgb: tuple[int, int, int]

    def phrase(self, with_size: bool = True, with_color: bool = True) -> str:
        """E.g. "a large red circle" (or "a red circle" without the size, "a large circle" without the colour)."""
        words = [self.size] if with_size else []
        words += [self.color, self.shape] if with_color else [self.shape]
        return article(" ".join(words))


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image and describe it."""

    objects: tuple[ShapeObject, ...]
    caption: str
    background: int
    noise_seed: int
    held_out_pair: bool = False


def _choose(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _sample_object(
    rng: np.random.Generator,
    pair: tuple[str, str],
    position: str,
    center_range: tuple[float, float],
    within: tuple[float, float],
    image_size: int,
) -> ShapeObject:
    """Sample an object whose centre x lies in ``center_range`` and whose whole extent lies in ``within``."""
    shape, color = pair
    size = _choose(rng, SIZE_NAMES)
    radius = SIZES[size] * image_size * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    extent = MAX_EXTENT * radius + 1
    low, high = max(center_range[0], within[0] + extent), min(center_range[1], within[1] - extent)
    center_x = rng.uniform(low, high) if high > low else (within[0] + within[1]) / 2
    center_y = rng.uniform(extent, image_size - extent)
    rgb = tuple(
        int(np.clip(value + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1), 0, 255)) for value in COLORS[color]
    )
    return ShapeObject(shape, color, size, position, float(center_x), float(center_y), float(radius), rgb)


def _object_phrase(rng: np.random.Generator, obj: ShapeObject, config: ShapesConfig) -> str:
    with_size = rng.random() >= config.size_drop_probability
    # Only drawn when colours may be dropped, so that the default settings keep their random stream.
    with_color = config.color_drop_probability == 0 or rng.random() >= config.color_drop_probability
    return obj.phrase(with_size=with_size, with_color=with_color)


def _caption_one(rng: np.random.Generator, obj: ShapeObject, config: ShapesConfig) -> str:
    phrase = _object_phrase(rng, obj, config)
    if rng.random() < config.position_drop_probability:
        return _choose(rng, ("{}", "a picture of {}", "there is {}")).format(phrase)
    where = POSITION_PHRASES[obj.position]
    return _choose(rng, ("{} {}", "a picture of {} {}", "there is {} {}")).format(phrase, where)


def _caption_two(rng: np.random.Generator, left: ShapeObject, right: ShapeObject, config: ShapesConfig) -> str:
    first = _object_phrase(rng, left, config)
    second = _object_phrase(rng, right, config)
    template = _choose(
        rng,
        (
            "{left} to the left of {right}",
            "{right} to the right of {left}",
            "{left} and {right}",
            "{left} on the left and {right} on the right",
        ),
    )
    return template.format(left=first, right=second)


def sample_scene(split: str, index: int, config: ShapesConfig) -> Scene:
    """Draw the attributes and caption of sample ``index`` of ``split`` (deterministic in seed, split, index)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
    size = config.image_size
    seen, held_out = config.seen_pairs(), list(config.held_out_pairs)
    use_held_out = False
    if split == "test":
        use_held_out = bool(held_out) and rng.random() < config.held_out_test_fraction
        num_objects = 1
    else:
        num_objects = 2 if rng.random() < config.two_object_probability else 1
    if num_objects == 1:
        pair = _choose(rng, held_out if use_held_out else seen)
        position = _choose(rng, POSITION_NAMES)
        center = POSITIONS[position] * size
        center_range = (center - _POSITION_JITTER * size, center + _POSITION_JITTER * size)
        objects = (_sample_object(rng, pair, position, center_range, (0.0, float(size)), size),)
        caption = _caption_one(rng, objects[0], config)
    else:
        # Each object stays inside its half of the image, so they never overlap.
        left_half, right_half = (0.0, size / 2), (size / 2, float(size))
        left = _sample_object(rng, _choose(rng, seen), "left", left_half, left_half, size)
        right = _sample_object(rng, _choose(rng, seen), "right", right_half, right_half, size)
        objects = (left, right)
        caption = _caption_two(rng, left, right, config)
    background = int(rng.integers(25, 71))
    noise_seed = int(rng.integers(2**31))
    return Scene(objects, caption, background, noise_seed, held_out_pair=use_held_out)


def _shape_polygon(obj: ShapeObject, scale: float) -> list[tuple[float, float]] | None:
    cx, cy, r = obj.center_x * scale, obj.center_y * scale, obj.radius * scale
    if obj.shape == "square":
        half = SQUARE_HALF_SIDE * r
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if obj.shape == "triangle":
        radius = TRIANGLE_CIRCUMRADIUS * r
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
    if obj.shape == "star":
        outer = STAR_OUTER_RADIUS * r
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else outer * STAR_INNER_RATIO
            angle = np.deg2rad(-90 + 36 * k)
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    if obj.shape == "cross":
        half, arm = CROSS_HALF_WIDTH * r, CROSS_HALF_WIDTH * CROSS_ARM_RATIO * r
        return [
            (cx - arm, cy - half), (cx + arm, cy - half), (cx + arm, cy - arm), (cx + half, cy - arm),
            (cx + half, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + half), (cx - arm, cy + half),
            (cx - arm, cy + arm), (cx - half, cy + arm), (cx - half, cy - arm), (cx - arm, cy - arm),
        ]  # fmt: skip
    return None


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image (anti-aliased by drawing at 4x and box-downsampling, then light noise)."""
    canvas_size = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), (scene.background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        polygon = _shape_polygon(obj, _SUPERSAMPLE)
        if polygon is None:  # circle
            cx, cy, r = (value * _SUPERSAMPLE for value in (obj.center_x, obj.center_y, obj.radius))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.rgb)
        else:
            draw.polygon(polygon, fill=obj.rgb)
    image = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.int16)
    noise = np.random.default_rng(scene.noise_seed).integers(-_NOISE, _NOISE + 1, size=image.shape)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8), mode="RGB")


def color_shape_class_names() -> list[str]:
    """Class names of the colour+shape task, index ``color_index * len(SHAPES) + shape_index``."""
    return [f"{color} {shape}" for color in COLOR_NAMES for shape in SHAPES]


def scene_metadata(scene: Scene) -> dict[str, Any]:
    """The metadata row of a scene: caption, labels of a lone object (-1 / "" with two objects), all objects."""
    row: dict[str, Any] = {"text": scene.caption, "num_objects": len(scene.objects)}
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        shape_index, color_index = SHAPES.index(obj.shape), COLOR_NAMES.index(obj.color)
        row.update(
            shape=obj.shape,
            color=obj.color,
            size=obj.size,
            position=obj.position,
            shape_label=shape_index,
            color_label=color_index,
            color_shape_label=color_index * len(SHAPES) + shape_index,
            size_label=SIZE_NAMES.index(obj.size),
        )
    else:
        row.update(shape="", color="", size="", position="", shape_label=-1, color_label=-1)
        row.update(color_shape_label=-1, size_label=-1)
    row["held_out_pair"] = scene.held_out_pair
    row["objects"] = [
        {
            "shape": obj.shape,
            "color": obj.color,
            "size": obj.size,
            "position": obj.position,
            "center_x": round(obj.center_x, 3),
            "center_y": round(obj.center_y, 3),
            "radius": round(obj.radius, 3),
        }
        for obj in scene.objects
    ]
    return row


def generate_examples(split: str, num_examples: int, config: ShapesConfig) -> Iterator[tuple[Image.Image, dict]]:
    """Yield ``(image, metadata row)`` for samples ``0 .. num_examples - 1`` of a split."""
    for index in range(num_examples):
        scene = sample_scene(split, index, config)
        yield render_scene(scene, config.image_size), scene_metadata(scene)


@dataclass(frozen=True)
class ZeroShotTask:
    """A zero-shot classification task on the test split: ``template.format(class_name)`` gives the prompts."""

    name: str
    label_column: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]

    def prompts(self, class_index: int) -> list[str]:
        """All prompts of one class (one per template), to be embedded and averaged."""
        return [template.format(self.class_names[class_index]) for template in self.templates]


# Templates marginalise over the attributes a task does not ask about, and put "a small"/"a large" before the class
# word where an article would otherwise depend on it ("an orange ...").
ZERO_SHOT_TASKS = {
    "shape": ZeroShotTask(
        "shape",
        "shape_label",
        SHAPES,
        tuple(f"a {size} {color} {{}}" for size in SIZE_NAMES for color in COLOR_NAMES),
    ),
    "color": ZeroShotTask(
        "color",
        "color_label",
        COLOR_NAMES,
        tuple(f"a {size} {{}} {shape}" for size in SIZE_NAMES for shape in SHAPES),
    ),
    "color_shape": ZeroShotTask(
        "color_shape",
        "color_shape_label",
        tuple(color_shape_class_names()),
        tuple(f"{prefix}a {size} {{}}" for prefix in ("", "a picture of ", "there is ") for size in SIZE_NAMES),
    ),
    "size": ZeroShotTask(
        "size",
        "size_label",
        SIZE_NAMES,
        tuple(f"a {{}} {color} {shape}" for color in COLOR_NAMES for shape in SHAPES),
    ),
}


def shapes_info(config: ShapesConfig, split_sizes: dict[str, int], data_format: str) -> dict[str, Any]:
    """The ``shapes_info.json`` content: settings, vocabulary, held-out pairs and zero-shot tasks."""
    return {
        "dataset": "msclip-shapes",
        "format": data_format,
        "config": asdict(config),
        "splits": split_sizes,
        "shapes": list(SHAPES),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "sizes": list(SIZE_NAMES),
        "positions": list(POSITION_NAMES),
        "held_out_pairs": [list(pair) for pair in config.held_out_pairs],
        "zero_shot_tasks": {name: asdict(task) for name, task in ZERO_SHOT_TASKS.items()},
    }


def write_shapes_dataset(
    output_dir: str | os.PathLike,
    *,
    num_train: int = 5000,
    num_validation: int = 500,
    num_test: int = 1000,
    config: ShapesConfig | None = None,
    data_format: str = "imagefolder",
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> Path:
    """Generate the dataset and write it to ``output_dir``.

    Layout for ``data_format="imagefolder"``: ``<split>/NNNNNN.png`` plus ``<split>/metadata.jsonl`` (columns
    ``file_name``, ``text`` and those of `scene_metadata`); for ``"webdataset"``: ``<split>/NNNNNN.tar`` with
    ``.png``, ``.txt`` and ``.json`` (the same metadata) per sample. Both get ``shapes_info.json`` at the top.
    Splits with zero examples are not written.

    Args:
        output_dir: target folder; must be empty unless ``overwrite`` (which replaces only the split folders and
            ``shapes_info.json``).
        num_train: training images.
        num_validation: validation images.
        num_test: test images.
        config: generation settings (defaults to `ShapesConfig()`).
        data_format: "imagefolder" or "webdataset".
        samples_per_shard: shard size for the webdataset format.
        overwrite: allow replacing a previous output.

    Returns:
        The output folder.
    """
    if data_format not in ("imagefolder", "webdataset"):
        raise ValueError(f"data_format must be 'imagefolder' or 'webdataset', got {data_format!r}")
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"The number of {split} examples must not be negative, got {count}")
    config = config if config is not None else ShapesConfig()
    root = prepare_output_dir(output_dir, overwrite=overwrite, owned=(*SPLITS, "shapes_info.json"))
    for split, count in counts.items():
        if count == 0:
            continue
        split_dir = root / split
        split_dir.mkdir()
        examples = generate_examples(split, count, config)
        if data_format == "imagefolder":
            with open(split_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata_file:
                for index, (image, row) in enumerate(examples):
                    file_name = f"{index:06d}.png"
                    image.save(split_dir / file_name)
                    metadata_file.write(json.dumps({"file_name": file_name, **row}) + "\n")
        else:
            with WebDatasetShardWriter(split_dir, samples_per_shard=samples_per_shard) as writer:
                for image, row in examples:
                    caption = row.pop("text")
                    writer.write(_png_bytes(image), "png", caption, row)
    info = shapes_info(config, {split: count for split, count in counts.items() if count}, data_format)
    with open(root / "shapes_info.json", "w", encoding="utf-8") as info_file:
        json.dump(info, info_file, indent=2)
    return root


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_shapes_info(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``shapes_info.json`` of a written shapes dataset."""
    path = Path(dataset_dir) / "shapes_info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {dataset_dir} a shapes dataset written by write_shapes_dataset?")
    with open(path, encoding="utf-8") as info_file:
        return json.load(info_file)


# Tasks whose classes are colour x shape pairs: besides all test images, the images of held-out pairs (never drawn in
# training) and of seen pairs are scored apart, which is what tells composition from memorised pairs.
PAIR_TASKS = ("color_shape",)


def evaluate_shapes_dataset(
    model: Any,
    processor: Any,
    root: str | os.PathLike,
    *,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot classification on every task of a written shapes dataset, and retrieval, on one split.

    Every task of `ZERO_SHOT_TASKS` is `evaluation_msclip.evaluate_zero_shot` with its own class names, prompt
    templates and label column, on the images that have that label (two-object scenes, labelled -1, are left out).
    On the tasks of `PAIR_TASKS` the images of held-out colour x shape pairs and of seen pairs are also scored apart,
    as ``zeroshot_<task>_held_out_pairs`` / ``zeroshot_<task>_seen_pairs``. Retrieval is
    `evaluation_msclip.evaluate_retrieval` on the whole split. Each evaluation encodes its own images, so an image
    is encoded once per result it counts in.

    Args:
        model: MS-CLIP (or any model with ``get_text_features`` / ``get_image_features``).
        processor: a processor with ``.tokenizer`` and ``.image_processor``, or a ``(tokenizer, image_transform)``
            pair.
        root: a folder written by `write_shapes_dataset` in the image-folder format.
        split: the split to evaluate.
        tasks: names of `ZERO_SHOT_TASKS` to run (default: all).
        batch_size: batch size of both encoders.
        max_samples: evaluate a random subset of this many images (seed 0), the same one for every task.

    Returns:
        ``{"zeroshot_<task>": zero_shot_metrics, ..., "retrieval": retrieval_metrics}``; each ``num_skipped``
        counts the unusable records among that result's images.
    """
    # Imported here so that drawing the data (make_shapes_dataset.py) does not load the evaluation stack.
    from modeling_msclip.evaluation_msclip import evaluate_retrieval, evaluate_zero_shot, load_eval_dataset

    load_shapes_info(root)  # fails clearly when root is not a shapes dataset
    tasks = list(tasks) if tasks else list(ZERO_SHOT_TASKS)
    unknown = sorted(set(tasks) - set(ZERO_SHOT_TASKS))
    if unknown:
        raise ValueError(f"unknown shapes task(s) {unknown}; choose from {sorted(ZERO_SHOT_TASKS)}")
    dataset = load_eval_dataset(root, max_samples, split=split, purpose="retrieval")
    missing = [
        ZERO_SHOT_TASKS[name].label_column
        for name in tasks
        if ZERO_SHOT_TASKS[name].label_column not in dataset.column_names
    ]
    if missing:
        # Webdataset shards keep the labels inside each sample's JSON, where no column can be selected on.
        raise ValueError(
            f"{root}/{split} has no label column(s) {missing}: the shapes evaluation reads the image-folder format "
            "of write_shapes_dataset (metadata.jsonl columns), not webdataset shards"
        )
    held_out = dataset["held_out_pair"] if any(name in PAIR_TASKS for name in tasks) else None
    results: dict[str, dict[str, Any]] = {}
    for name in tasks:
        task = ZERO_SHOT_TASKS[name]
        labelled = [index for index, label in enumerate(dataset[task.label_column]) if label >= 0]
        subsets = {f"zeroshot_{name}": labelled}
        if name in PAIR_TASKS:
            subsets[f"zeroshot_{name}_seen_pairs"] = [index for index in labelled if not held_out[index]]
            subsets[f"zeroshot_{name}_held_out_pairs"] = [index for index in labelled if held_out[index]]
        for key, indices in subsets.items():
            if indices:  # a subset without images has no score (e.g. no held-out pair in a small split)
                results[key] = evaluate_zero_shot(
                    model,
                    processor,
                    dataset.select(indices),
                    list(task.class_names),
                    task.templates,
                    label_column=task.label_column,
                    batch_size=batch_size,
                )
    results["retrieval"] = evaluate_retrieval(model, processor, dataset, batch_size=batch_size)
    return results
