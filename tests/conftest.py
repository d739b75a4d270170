"""Fixtures shared by several test files. Keep this file small: one-file fixtures belong in their test file.

SHARED_DIR is the read-only reference material next to the repository (../shared); tests read it, never copy it.
"""

from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def msclip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved MS-CLIP tokenizer directory, built once per session from the shared CLIP BPE vocabulary."""
    from modeling_msclip.tokenization_msclip import build_msclip_tokenizer

    vocab_path = SHARED_DIR / "reference" / "msclip_official" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    if not vocab_path.is_file():
        raise FileNotFoundError(f"The shared CLIP BPE vocabulary is missing: {vocab_path}")
    output_dir = tmp_path_factory.mktemp("msclip_tokenizer")
    build_msclip_tokenizer(vocab_path).save_pretrained(output_dir)
    return output_dir
