"""MSClipImageProcessor against a hand-written PIL/NumPy pipeline; MSClipProcessor, saving, Auto and remote code."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedConfig

from modeling_msclip.image_processing_msclip import MSClipImageProcessor
from modeling_msclip.processing_msclip import MSClipProcessor, remote_code_files
from modeling_msclip.tokenization_msclip import MSClipTokenizer

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow, far away"]


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def hand_preprocess(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """The official evaluation transform written out: torchvision-style Resize(size, bicubic) on the shortest edge,
    CenterCrop(size) with rounded offsets, ToTensor, Normalize."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    pixels = np.asarray(image.resize((new_width, new_height), Image.BICUBIC), dtype=np.float64) / 255.0
    top, left = round((new_height - size) / 2), round((new_width - size) / 2)
    pixels = pixels[top : top + size, left : left + size]
    pixels = (pixels - np.array(mean)) / np.array(std)
    return pixels.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def tokenizer(msclip_tokenizer_dir: Path) -> MSClipTokenizer:
    return MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)


@pytest.fixture(scope="module")
def saved_processor_dir(tokenizer, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("msclip_processor")
    MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=40), tokenizer).save_pretrained(directory)
    return directory


def test_image_processor_defaults_are_the_msclip_preset():
    processor = MSClipImageProcessor()
    assert processor.size.shortest_edge == 224
    assert (processor.crop_size.height, processor.crop_size.width) == (224, 224)
    assert tuple(processor.image_mean) == IMAGENET_MEAN and tuple(processor.image_std) == IMAGENET_STD
    assert processor.resample == Image.BICUBIC
    assert processor.do_convert_rgb and processor.do_center_crop and processor.do_normalize


@pytest.mark.parametrize(
    ("preset", "size", "height", "width", "mean", "std"),
    [
        # Resized width 47: the crop excess 7 puts torchvision's offset (round 3.5 = 4) one pixel past a floor (3).
        ("msclip", 40, 40, 47, IMAGENET_MEAN, IMAGENET_STD),
        ("clip", 32, 61, 37, OPENAI_MEAN, OPENAI_STD),
        ("msclip", 224, 230, 300, IMAGENET_MEAN, IMAGENET_STD),
    ],
)
def test_image_processor_matches_hand_pipeline(preset, size, height, width, mean, std):
    image = random_image(height, width, seed=size)
    processor = MSClipImageProcessor.from_preset(preset, image_size=size)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, size, size) and pixel_values.dtype == torch.float32
    expected = hand_preprocess(image, size, mean, std)
    assert_close_to_scale(pixel_values[0], expected, 1e-5, f"{preset} {size} px pixels")


def test_centre_crop_rounds_like_torchvision():
    image = random_image(40, 47, seed=1)
    ours = MSClipImageProcessor.from_preset("msclip", image_size=40)(image, return_tensors="np")["pixel_values"][0]
    resized = np.asarray(image, dtype=np.float64) / 255.0  # already 40 high: the resize is the identity
    shifted_by_floor = ((resized[:, 3:43] - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    rounded = ((resized[:, 4:44] - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    assert_close_to_scale(ours, rounded, 1e-5, "torchvision-rounded crop")
    assert np.abs(ours - shifted_by_floor).max() > 0.1


def test_grey_and_rgba_images_become_three_channels():
    processor = MSClipImageProcessor.from_preset("msclip", image_size=16)
    for mode in ("L", "RGBA"):
        image = random_image(20, 24, mode=mode)
        pixel_values = processor(image, return_tensors="np")["pixel_values"]
        assert pixel_values.shape == (1, 3, 16, 16)
        expected = hand_preprocess(image, 16, IMAGENET_MEAN, IMAGENET_STD)
        assert_close_to_scale(pixel_values[0], expected, 1e-5, f"{mode} image pixels")


def test_from_preset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        MSClipImageProcessor.from_preset("imagenet21k")
    with pytest.raises(ValueError, match="image_size"):
        MSClipImageProcessor.from_preset("clip", image_size=0)


def test_image_processor_save_load_round_trip(tmp_path):
    processor = MSClipImageProcessor.from_preset("clip", image_size=48)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "MSClipImageProcessor"
    assert config["auto_map"]["AutoImageProcessor"] == "image_processing_msclip.MSClipImageProcessor"
    assert (tmp_path / "image_processing_msclip.py").is_file()
    reloaded = MSClipImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    image = random_image(50, 70)
    np.testing.assert_array_equal(reloaded(image)["pixel_values"][0], processor(image)["pixel_values"][0])


def test_processor_returns_model_inputs(tokenizer):
    processor = MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=32), tokenizer)
    images = [random_image(40, 50, seed=0), random_image(64, 48, seed=1)]
    inputs = processor(text=CAPTIONS, images=images, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    expected_text = tokenizer(CAPTIONS, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected_text["input_ids"])
    assert torch.equal(inputs["attention_mask"], expected_text["attention_mask"])
    assert inputs["input_ids"].shape == (2, max(len(tokenizer(c)["input_ids"]) for c in CAPTIONS))
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert set(processor(text=CAPTIONS, return_tensors="pt")) == {"input_ids", "attention_mask"}
    assert set(processor(images=images, return_tensors="pt")) == {"pixel_values"}
    fixed = processor(text=CAPTIONS, padding="max_length", return_tensors="pt")
    assert fixed["input_ids"].shape == (2, 77)


def test_processor_passes_truncation_style_to_the_tokenizer(tokenizer):
    processor = MSClipProcessor(tokenizer=tokenizer)
    long_caption = "cat " * 100
    kept = processor(text=[long_caption], return_tensors="pt")["input_ids"][0]
    official = processor(text=[long_caption], truncation_style="official", return_tensors="pt")["input_ids"][0]
    assert kept[-1] == tokenizer.eos_token_id and official[-1] == kept[-2]
    assert torch.equal(kept[:-1], official[:-1])


def test_processor_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="tokenizer"):
        MSClipProcessor(MSClipImageProcessor())


def test_processor_save_load_round_trip(saved_processor_dir):
    names = {path.name for path in saved_processor_dir.iterdir()}
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {path.name for path in remote_code_files()} <= names
    reloaded = MSClipProcessor.from_pretrained(saved_processor_dir)
    assert reloaded.image_processor.crop_size.height == 40
    assert tuple(reloaded.image_processor.image_mean) == IMAGENET_MEAN
    image = random_image(45, 60)
    original = MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=40), reloaded.tokenizer)
    a = reloaded(text=CAPTIONS, images=[image, image], return_tensors="pt")
    b = original(text=CAPTIONS, images=[image, image], return_tensors="pt")
    assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "attention_mask", "pixel_values"))


class _ProcessingTestConfig(PreTrainedConfig):
    """Stand-in config: the Auto classes need a config class to register the processing classes against."""

    model_type = "msclip_processing_test"


def test_auto_classes_load_the_saved_processor(saved_processor_dir):
    AutoTokenizer.register(_ProcessingTestConfig, tokenizer_class=MSClipTokenizer, exist_ok=True)
    AutoImageProcessor.register(
        _ProcessingTestConfig, image_processor_classes={"pil": MSClipImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(_ProcessingTestConfig, MSClipProcessor, exist_ok=True)
    assert type(AutoTokenizer.from_pretrained(saved_processor_dir)) is MSClipTokenizer
    image_processor = AutoImageProcessor.from_pretrained(saved_processor_dir)
    assert type(image_processor) is MSClipImageProcessor and image_processor.crop_size.height == 40
    processor = AutoProcessor.from_pretrained(saved_processor_dir)
    assert type(processor) is MSClipProcessor
    assert (
        processor(text="a diagram")["input_ids"]
        == MSClipTokenizer.from_pretrained(saved_processor_dir)("a diagram")["input_ids"]
    )


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_msclip"] = None  # an installed (editable) package must not be used either
    try:
        import modeling_msclip
        raise SystemExit("modeling_msclip is importable")
    except ImportError:
        pass
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    tokenizer_dir, processor_dir, captions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    image = Image.fromarray(np.arange(45 * 60 * 3, dtype=np.uint8).reshape(45, 60, 3))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(processor_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(processor_dir, trust_remote_code=True)
    print(json.dumps({
        "classes": [type(tokenizer).__module__ + "." + type(tokenizer).__name__, type(image_processor).__name__,
                    type(processor).__name__],
        "input_ids": tokenizer(captions, padding="max_length")["input_ids"],
        "processor_ids": processor(text=captions)["input_ids"],
        "pixel_values": image_processor(image, return_tensors="np")["pixel_values"].tolist(),
    }))
    """
)


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(msclip_tokenizer_dir, saved_processor_dir, tmp_path, tokenizer):
    # Copies in a plain folder: what a user downloads from the Hub, with the .py files save_pretrained put there.
    tokenizer_dir, processor_dir = tmp_path / "tokenizer", tmp_path / "processor"
    shutil.copytree(msclip_tokenizer_dir, tokenizer_dir)
    shutil.copytree(saved_processor_dir, processor_dir)
    work_dir = tmp_path / "cwd"
    work_dir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tokenizer_dir), str(processor_dir), json.dumps(CAPTIONS)],
        cwd=work_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    tokenizer_class, image_processor_class, processor_class = remote["classes"]
    assert tokenizer_class.startswith("transformers_modules.") and tokenizer_class.endswith(".MSClipTokenizer")
    assert (image_processor_class, processor_class) == ("MSClipImageProcessor", "MSClipProcessor")
    assert remote["input_ids"] == tokenizer(CAPTIONS, padding="max_length")["input_ids"]
    assert remote["processor_ids"] == tokenizer(CAPTIONS)["input_ids"]
    image = Image.fromarray(np.arange(45 * 60 * 3, dtype=np.uint8).reshape(45, 60, 3))
    local_pixels = MSClipImageProcessor.from_preset("msclip", image_size=40)(image)["pixel_values"][0]
    assert_close_to_scale(remote["pixel_values"][0], local_pixels, 1e-6, "remote-code pixels")
