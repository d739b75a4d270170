"""Fixtures shared by several test files. Keep this file small: one-file fixtures belong in their test file.

REFERENCE_DIR is the official MS-CLIP reference material next to the repository (../shared), which exists here and in
CI but on no user's machine. Tests read it, never copy it; a test that needs it is marked `needs_reference` and is
skipped, with the missing path as the reason, where it is absent (`.ci/run` refuses to run without it).
"""

import itertools
import os
import socket
import sys
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_DIR = SHARED_DIR / "reference" / "msclip_official"
CLIP_VOCAB = REFERENCE_DIR / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
needs_reference = pytest.mark.skipif(
    not REFERENCE_DIR.is_dir(), reason=f"needs the official MS-CLIP reference data: {REFERENCE_DIR} is missing"
)


def pytest_configure(config: pytest.Config) -> None:
    """With ``MSCLIP_REQUIRE_REFERENCE=1`` (set by `.ci/run`) a missing reference folder stops the run instead of
    skipping the tests that need it."""
    if os.environ.get("MSCLIP_REQUIRE_REFERENCE") == "1" and not REFERENCE_DIR.is_dir():
        pytest.exit(f"MSCLIP_REQUIRE_REFERENCE=1 but {REFERENCE_DIR} is missing", returncode=4)


# Captions for the suite's own tokenizer: enough text for a few hundred merges, and every word the tests' captions use
# is a handful of tokens at most. Any other text still encodes through the byte symbols.
_SUBJECTS = ("cat", "dog", "bird", "car", "tree", "house", "person", "circle", "square", "triangle", "star", "cross")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
_PHRASES = ("a photo of a", "a picture of a", "there is a", "an image of a", "a small", "a large")
TOKENIZER_CORPUS = [
    f"{phrase} {colour} {subject} on the {side}, hello world!"
    for phrase, colour, subject, side in itertools.product(_PHRASES, _COLOURS, _SUBJECTS, ("left", "right"))
]
TOKENIZER_VOCAB_SIZE = 600


@pytest.fixture(scope="session")
def msclip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved MS-CLIP tokenizer trained on `TOKENIZER_CORPUS` (no reference data needed), built once per session."""
    from modeling_msclip.tokenization_msclip import train_msclip_tokenizer

    output_dir = tmp_path_factory.mktemp("msclip_tokenizer")
    train_msclip_tokenizer(TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE).save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved MS-CLIP tokenizer with CLIP's official vocabulary (skipped where the reference data is absent)."""
    from modeling_msclip.tokenization_msclip import build_msclip_tokenizer

    if not CLIP_VOCAB.is_file():
        pytest.skip(f"needs the official CLIP BPE vocabulary: {CLIP_VOCAB} is missing")
    output_dir = tmp_path_factory.mktemp("clip_tokenizer")
    build_msclip_tokenizer(CLIP_VOCAB).save_pretrained(output_dir)
    return output_dir


def build_tiny_transformers_clip(words: list[str]):
    """A real, randomly initialised transformers `CLIPModel` (2 layers, width 32, 32 px) with a word-level tokenizer
    over ``words`` and a PIL image processor: a stand-in with CLIP's output structure for the evaluation tests."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {w: i + 4 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16
    )
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    model = CLIPModel(config)
    model.set_attn_implementation("eager")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tokenizer, image_processor


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for gloo rendezvous and accelerate launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_float64(value):
    """``value`` (tensor of any dtype/device, numpy array, Python number or nested list) as a float64 numpy array."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def difference_and_scale(actual, expected, what: str = "") -> tuple[float, float]:
    """``(max|actual - expected|, max(1, max|expected|))`` in float64; the shapes must match (no broadcasting). A NaN
    anywhere gives a NaN difference, which no tolerance accepts."""
    import numpy as np

    a, b = _as_float64(actual), _as_float64(expected)
    if a.shape != b.shape:
        raise AssertionError(f"{what or 'values'}: shape {a.shape} differs from the expected {b.shape}")
    if a.size == 0:
        return 0.0, 1.0
    difference = float(np.abs(a - b).max())
    scale = max(1.0, float(np.abs(b).max())) if np.isfinite(b).all() else float("nan")
    return difference, scale


def close_to_scale(actual, expected, tol: float, what: str = "") -> bool:
    """Whether ``max|actual - expected| <= tol * max(1, max|expected|)`` (float64; shapes must match).

    A float32 result carries an error relative to the size of what is computed, so a fixed absolute tolerance holds
    on one CPU and fails on the next once the values are large; this one scales with the expected values and is
    absolute below magnitude 1."""
    difference, scale = difference_and_scale(actual, expected, what)
    return difference <= tol * scale


def assert_close_to_scale(actual, expected, tol: float, what: str = "") -> None:
    """Assert `close_to_scale`; the message names ``what``, the largest difference and the scale."""
    difference, scale = difference_and_scale(actual, expected, what)
    assert difference <= tol * scale, (
        f"{what or 'values'}: max |difference| {difference:.3g} > {tol:g} x scale {scale:.3g} (= {tol * scale:.3g})"
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The docs test's count of fenced blocks run and marked (with the reasons), by page."""
    summary = getattr(sys.modules.get("test_docs"), "SUMMARY", None)
    if not summary:
        return
    terminalreporter.section("docs blocks: ran / marked, by page")
    for page, record in sorted(summary.items()):
        terminalreporter.write_line(f"{page}: ran {len(record['ran'])}, marked {len(record['marked'])}")
        for reason in record["marked"]:
            terminalreporter.write_line(f"    {reason}")
