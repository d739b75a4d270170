"""Bad input gets a clear error at the boundary: the model, the processor and the training collator.

The table cases of the issue are checked by message; the fuzz tests draw random shapes, dtypes and id ranges and
accept only two outcomes: finite outputs, or a ValueError/TypeError whose message names the argument. An
IndexError or a RuntimeError from deep inside torch fails the test, and so does a non-finite output.
"""

import io
import random

import numpy as np
import pytest
import torch
from conftest import TOKENIZER_CORPUS
from PIL import Image

from modeling_msclip import (
    MSClipConfig,
    MSClipForPreTraining,
    MSClipImageProcessor,
    MSClipModel,
    MSClipProcessor,
    train_msclip_tokenizer,
)
from modeling_msclip.collators_msclip import ImageTextCollator

SIZE = 64


@pytest.fixture(scope="module")
def model() -> MSClipForPreTraining:
    torch.manual_seed(0)
    return MSClipForPreTraining(MSClipConfig.from_preset("clip-tiny")).eval()


@pytest.fixture(scope="module")
def processor() -> MSClipProcessor:
    tokenizer = train_msclip_tokenizer(TOKENIZER_CORPUS, 600)
    return MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=SIZE), tokenizer)


def good_inputs(batch: int = 3) -> dict[str, torch.Tensor]:
    input_ids = torch.zeros(batch, 6, dtype=torch.long)
    input_ids[:, 0], input_ids[:, 1:4], input_ids[:, 4] = 49406, 320, 49407
    return {"input_ids": input_ids, "pixel_values": torch.randn(batch, 3, SIZE, SIZE)}


TABLE = {
    "id above the vocabulary": (
        {"input_ids": torch.full((3, 6), 49408)},
        r"input_ids must lie in \[0, 49407\] \(text_config.vocab_size 49408\), got ids from 49408 to 49408",
    ),
    "negative id": ({"input_ids": torch.tensor([[49406, -3, 49407]] * 3)}, r"got ids from -3 to 49407"),
    "no positions": ({"input_ids": torch.zeros(3, 0, dtype=torch.long)}, r"got shape \(3, 0\)"),
    "float ids": ({"input_ids": torch.ones(3, 6)}, r"input_ids must hold integer token ids, got dtype torch.float32"),
    "mask of another shape": (
        {"attention_mask": torch.ones(2, 5, dtype=torch.long)},
        r"attention_mask must have the shape of input_ids \(3, 6\), got \(2, 5\)",
    ),
    "uint8 pixels": (
        {"pixel_values": torch.zeros(3, 3, SIZE, SIZE, dtype=torch.uint8)},
        r"pixel_values must be floating point \(normalised pixels\), got dtype torch.uint8",
    ),
    "unpaired batch with a loss": (
        {"pixel_values": torch.randn(2, 3, SIZE, SIZE), "return_loss": True},
        r"input_ids has 3 captions and pixel_values 2 images",
    ),
    "list of ids": ({"input_ids": [[49406, 49407]]}, r"input_ids must be a torch.Tensor of token ids, got list"),
}


@pytest.mark.parametrize("case", list(TABLE))
@pytest.mark.parametrize("model_class", ["MSClipModel", "MSClipForPreTraining"])
def test_bad_inputs_name_the_argument_expected_and_actual_value(model, case, model_class):
    changes, message = TABLE[case]
    inputs = {**good_inputs(), **changes}
    target = model.msclip if model_class == "MSClipModel" else model
    if model_class == "MSClipModel":
        inputs.setdefault("return_loss", False)
    error = TypeError if case == "list of ids" and model_class == "MSClipModel" else (ValueError, TypeError)
    with pytest.raises(error, match=message):
        target(**inputs)


def test_unpaired_batches_are_fine_without_a_loss(model):
    inputs = {**good_inputs(3), "pixel_values": torch.randn(2, 3, SIZE, SIZE)}
    with torch.no_grad():
        output = model.msclip(**inputs)
    assert output.logits_per_image.shape == (2, 3)


def _random_ids(rng: random.Random) -> torch.Tensor | list:
    # Each draw is well-formed more often than not, so that both outcomes occur in good numbers.
    dtype = rng.choice([torch.long] * 6 + [torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool])
    shape = rng.choice([(3, 6)] * 6 + [(3, 77), (3, 78), (3, 0), (0, 6), (6,), (3, 2, 6), (1, 1)])
    if rng.random() < 0.05:
        return [[1, 2, 3]]
    low, high = rng.choice([(0, 49408)] * 6 + [(-5, 100), (49000, 49500), (0, 2)])
    ids = torch.randint(low, high, shape) if 0 not in shape else torch.zeros(shape, dtype=torch.long)
    if len(shape) == 2 and shape[1] > 0 and rng.random() < 0.6:
        ids[:, -1] = 49407
    return ids.to(dtype) if dtype != torch.uint8 else ids.clamp(0, 255).to(dtype)


def _random_pixels(rng: random.Random, batch: int) -> torch.Tensor:
    dtype = rng.choice([torch.float32] * 4 + [torch.float64, torch.bfloat16, torch.uint8, torch.long])
    shape = rng.choice([(batch, 3, SIZE, SIZE)] * 6 + [(batch + 1, 3, SIZE, SIZE), (batch, 1, SIZE, SIZE)])
    shape = rng.choice([shape] * 6 + [(batch, 3, 32, 32), (3, SIZE, SIZE), (0, 3, SIZE, SIZE)])
    return (torch.rand(shape) * 4 - 2).to(dtype) if dtype.is_floating_point else torch.randint(0, 255, shape).to(dtype)


def _assert_finite(value, what: str) -> None:
    if isinstance(value, torch.Tensor):
        assert torch.isfinite(value.float()).all(), what
    elif isinstance(value, dict):
        for key, item in value.items():
            _assert_finite(item, f"{what}.{key}")
    elif hasattr(value, "to_tuple"):
        for index, item in enumerate(value.to_tuple()):
            _assert_finite(item, f"{what}[{index}]")


def call_or_clear_error(call, described: str):
    """``call()``'s output, or None when it raised a ValueError/TypeError with a message; any other error fails."""
    try:
        with torch.no_grad():
            return call()
    except (ValueError, TypeError) as error:
        assert str(error), f"{described}: an error without a message"
        return None
    except Exception as error:  # noqa: BLE001 - any other exception is what these tests are for
        pytest.fail(f"{described}: {type(error).__name__}: {error}")


def test_fuzzed_model_inputs_give_finite_outputs_or_a_clear_error(model):
    rng = random.Random(0)
    outcomes = {"ok": 0, "error": 0}
    for case in range(150):
        input_ids = _random_ids(rng)
        batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else 1
        inputs = {"input_ids": input_ids, "pixel_values": _random_pixels(rng, batch)}
        if rng.random() < 0.3 and isinstance(input_ids, torch.Tensor):
            inputs["attention_mask"] = rng.choice([torch.ones_like(input_ids), torch.ones(2, 5, dtype=torch.long)])
        return_loss = rng.random() < 0.5
        target = rng.choice([model, model.msclip])
        shapes = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        described = f"case {case} {shapes} return_loss={return_loss}"
        output = call_or_clear_error(lambda: target(**inputs, return_loss=return_loss), described)  # noqa: B023
        if output is None:
            outcomes["error"] += 1
            continue
        _assert_finite(output, described)
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 20, outcomes


def _random_image(rng: random.Random):
    kind = rng.choice(["pil", "numpy", "torch", "junk"])
    height, width = rng.choice([(40, 30), (1, 1), (64, 200), (0, 5), (5, 0)])
    if kind == "pil":
        mode = rng.choice(["RGB", "L", "LA", "P", "RGBA", "CMYK", "I", "F", "1"])
        return Image.new(mode, (width, height))
    if kind == "numpy":
        dtype = rng.choice([np.uint8, np.float32, np.float64])
        shape = rng.choice([(height, width, 3), (3, height, width), (height, width), (height, width, 5)])
        return np.random.default_rng(0).random(shape).astype(dtype)
    if kind == "torch":
        return torch.rand(rng.choice([(3, height, width), (height, width, 3), (1, 3, height, width)]))
    return rng.choice(["not an image", 7, None, {"bytes": b"xx"}, b"\x89PNG broken"])


def _random_text(rng: random.Random):
    return rng.choice(
        ["a red circle", ["a", "b c"], [], [""], ["x" * 2000], ["日本語 🙂"], 5, [None], [["nested"]], None]
    )


def test_fuzzed_processor_inputs_give_finite_outputs_or_a_clear_error(processor):
    rng = random.Random(1)
    outcomes = {"ok": 0, "error": 0}
    for case in range(150):
        call = {}
        if rng.random() < 0.7:
            images = [_random_image(rng) for _ in range(rng.randint(0, 3))]
            call["images"] = images[0] if len(images) == 1 and rng.random() < 0.5 else images
        if rng.random() < 0.6 or not call:
            call["text"] = _random_text(rng)
        if call.get("text") is None and "images" not in call:
            continue
        output = call_or_clear_error(lambda: processor(**call, return_tensors="pt"), f"case {case} {call!r}")  # noqa: B023
        if output is None:
            outcomes["error"] += 1
            continue
        _assert_finite(dict(output), f"case {case}")
        if "pixel_values" in output:
            assert output["pixel_values"].shape[1:] == (3, SIZE, SIZE)
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 20, outcomes


def _png_bytes(mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (20, 20), 128 if mode in ("L", "I", "I;16") else None).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fuzzed_records_never_break_the_training_collator(processor):
    collator = ImageTextCollator(processor.tokenizer, processor.image_processor)
    rng = random.Random(2)
    images = [
        {"bytes": _png_bytes("RGB"), "path": None},
        {"bytes": _png_bytes("L"), "path": None},
        {"bytes": b"not a png", "path": None},
        {"bytes": None, "path": "/nonexistent/x.png"},
        Image.new("RGBA", (9, 9)),
        None,
        7,
        "relative/missing.jpg",
    ]
    texts = ["a red circle", "", "   ", None, 5, ["first", "second"], [], ["", None], "x" * 3000]
    for _ in range(100):
        records = [{"image": rng.choice(images), "text": rng.choice(texts)} for _ in range(rng.randint(0, 6))]
        batch = collator(records)
        size = batch["input_ids"].shape[0]
        assert batch["pixel_values"].shape[0] == batch["attention_mask"].shape[0] == size <= len(records)
        assert torch.isfinite(batch["pixel_values"]).all()
        if size:
            assert batch["input_ids"].shape[1] <= 77
            assert (batch["input_ids"].max(dim=1).values == processor.tokenizer.eos_token_id).all()
    assert collator.stats.as_dict()["seen"] > collator.stats.as_dict()["kept"] > 0


def test_a_model_with_another_vocabulary_is_told_so(processor):
    small = MSClipConfig.from_preset("clip-tiny")
    small.text_config.vocab_size = 100
    model = MSClipModel(small).eval()
    inputs = processor(text=["a small green picture"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"text_config.vocab_size 100\), got ids from \d+ to 599"):
        model.get_text_features(**inputs)
