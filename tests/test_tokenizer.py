"""MSClipTokenizer against the official MS-CLIP tokenizer ids (shared/reference/.../tokenizer_reference.json)."""

import gzip
import html
import importlib.util
import json
import random
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from conftest import CLIP_VOCAB, REFERENCE_DIR, needs_reference
from tokenizers import Tokenizer

from modeling_msclip.tokenization_msclip import MSClipTokenizer, build_msclip_tokenizer, clean_caption

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_REFERENCE_DIR = REFERENCE_DIR / "tokenizer"
VOCAB_PATH = CLIP_VOCAB
START_ID, END_ID, PAD_ID, CONTEXT = 49406, 49407, 0, 77
# Every test here compares with the official ids or builds from the official vocabulary.
pytestmark = needs_reference


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((TOKENIZER_REFERENCE_DIR / "tokenizer_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir: Path) -> MSClipTokenizer:
    return MSClipTokenizer.from_pretrained(clip_tokenizer_dir)


def load_build_tokenizer_cli():
    """Import processing/build_tokenizer.py by path (processing/ is a script folder, not an installed package)."""
    spec = importlib.util.spec_from_file_location("build_tokenizer", REPO_ROOT / "processing" / "build_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unpadded(row: list[int]) -> list[int]:
    """Official row without its trailing zero padding."""
    length = len(row)
    while length and row[length - 1] == PAD_ID:
        length -= 1
    return row[:length]


def test_reference_constants(tokenizer, reference):
    assert (reference["sot_token_id"], reference["eot_token_id"]) == (START_ID, END_ID)
    assert reference["context_length"] == CONTEXT == tokenizer.model_max_length
    assert len(tokenizer) == reference["vocab_size"] == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (START_ID, END_ID, PAD_ID)


def test_fitting_captions_match_official_rows(tokenizer, reference):
    fitting = [case for case in reference["cases"] if case["eot_kept"]]
    assert len(fitting) >= 50
    for case in fitting:
        encoded = tokenizer(case["text"], padding="max_length")
        assert encoded["input_ids"] == case["tokenize_77"], case["text"]
        length = case["num_bpe_tokens"] + 2
        assert encoded["attention_mask"] == [1] * length + [0] * (CONTEXT - length), case["text"]
        ids = torch.tensor(encoded["input_ids"])
        assert int(ids.argmax()) == case["argmax_position"], case["text"]


def test_encode_and_decode_match_official_for_every_caption(tokenizer, reference):
    for case in reference["cases"]:
        ids = tokenizer.encode(case["text"], add_special_tokens=False)
        assert ids == case["encode"], case["text"]
        assert tokenizer.decode(case["encode"]) == case["decode"], case["text"]


def test_batch_encoding_equals_one_by_one(tokenizer, reference):
    texts = [case["text"] for case in reference["cases"]]
    batch = tokenizer(texts, padding="max_length")["input_ids"]
    assert batch == [tokenizer(text, padding="max_length")["input_ids"] for text in texts]


def test_75_token_caption_fills_the_context(tokenizer, reference):
    (case,) = [case for case in reference["cases"] if case["num_bpe_tokens"] == 75]
    encoded = tokenizer(case["text"])
    assert len(encoded["input_ids"]) == CONTEXT
    assert encoded["input_ids"] == case["tokenize_77"]
    assert encoded["input_ids"][76] == END_ID
    assert encoded["attention_mask"] == [1] * CONTEXT


def test_over_length_captions_keep_their_end_token(tokenizer, reference):
    over_length = [case for case in reference["cases"] if not case["eot_kept"]]
    assert len(over_length) >= 2
    for case in over_length:
        row = tokenizer(case["text"])["input_ids"]
        assert len(row) == CONTEXT
        assert row == [START_ID] + case["encode"][:75] + [END_ID]
        assert row[:76] == case["tokenize_77"][:76]
        assert int(torch.tensor(row).argmax()) == 76


def test_official_truncation_style_reproduces_every_official_row(tokenizer, reference, clip_tokenizer_dir):
    official = MSClipTokenizer.from_pretrained(clip_tokenizer_dir, truncation_style="official")
    texts = [case["text"] for case in reference["cases"]]
    rows = [case["tokenize_77"] for case in reference["cases"]]
    assert official(texts, padding="max_length")["input_ids"] == rows
    assert tokenizer(texts, padding="max_length", truncation_style="official")["input_ids"] == rows
    dropped = [case for case in reference["cases"] if not case["eot_kept"]]
    for case in dropped:
        encoded = official(case["text"], return_tensors="pt")
        assert encoded["input_ids"].shape == (1, CONTEXT)
        assert END_ID not in encoded["input_ids"][0].tolist()
        assert encoded["attention_mask"].sum() == CONTEXT


def test_dynamic_padding_pads_to_the_longest_caption(tokenizer, reference):
    cases = {case["num_bpe_tokens"]: case for case in reference["cases"]}
    short, medium = cases[2], cases[16]
    encoded = tokenizer([short["text"], medium["text"]], return_tensors="pt")
    assert encoded["input_ids"].shape == (2, 16 + 2)
    assert encoded["input_ids"][0].tolist() == unpadded(short["tokenize_77"]) + [PAD_ID] * 14
    assert encoded["attention_mask"][0].tolist() == [1] * 4 + [0] * 14
    assert encoded["attention_mask"][1].tolist() == [1] * 18
    with_long = tokenizer([short["text"], cases[134]["text"]], return_tensors="pt")
    assert with_long["input_ids"].shape == (2, CONTEXT)
    fixed = tokenizer([short["text"]], padding="max_length", return_tensors="pt")
    assert fixed["input_ids"][0].tolist() == short["tokenize_77"]


def test_padding_token_is_not_a_special_token(tokenizer):
    # "!" has id 0 (first byte of the vocabulary) and "!</w>" id 256; padding must not change how "!" encodes.
    assert tokenizer.pad_token == "!"
    assert "!" not in tokenizer.all_special_tokens
    assert tokenizer.encode("wow!", add_special_tokens=False)[-1] == 256
    assert tokenizer.encode("!!", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids("!!</w>")]


def test_literal_special_tokens_follow_official_lowercasing(tokenizer):
    lower = tokenizer.encode("a <|endoftext|> b", add_special_tokens=False)
    assert END_ID in lower
    assert tokenizer.encode("A <|ENDOFTEXT|> B", add_special_tokens=False) == lower


def test_decode_skips_padding_but_keeps_real_zero_ids(tokenizer):
    batch = tokenizer(["a cat", "a photo of a dog"])
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["a cat ", "a photo of a dog "]
    hash_end = tokenizer.convert_tokens_to_ids("#</w>")
    assert tokenizer.decode([START_ID, 0, hash_end, END_ID, 0, 0], skip_special_tokens=True) == "!# "


def test_bad_inputs_raise_clear_errors(tokenizer, clip_tokenizer_dir):
    with pytest.raises(ValueError, match="truncation_style"):
        tokenizer("a cat", truncation_style="middle")
    with pytest.raises(ValueError, match="truncation_style"):
        MSClipTokenizer.from_pretrained(clip_tokenizer_dir, truncation_style="middle")
    with pytest.raises(ValueError, match="text_pair"):
        tokenizer("a cat", "a dog")
    with pytest.raises(ValueError, match="empty batch"):
        tokenizer([])
    with pytest.raises(TypeError, match="must be a str"):
        clean_caption(3)
    with pytest.raises(ValueError, match="vocab"):
        MSClipTokenizer()
    with pytest.raises(ValueError, match="pads with id 0"):
        MSClipTokenizer.from_pretrained(clip_tokenizer_dir, pad_token="<|endoftext|>")


def _reference_encode(
    text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], byte_symbol: dict[int, str]
) -> list[int]:
    """The official algorithm written out in plain Python: clean, split, byte-map, greedy lowest-rank merges."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = regex.sub(r"\s+", " ", text).strip().lower()
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = []
    for piece in regex.findall(pattern, text, regex.IGNORECASE):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[piece])
            continue
        word = [byte_symbol[byte] for byte in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[symbol] for symbol in word)
    return ids


def test_fast_path_equals_plain_python_bpe_on_exotic_unicode(tokenizer):
    merges = gzip.open(VOCAB_PATH).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merges)}
    vocab = tokenizer.get_vocab()
    # Ids 0-255 are the byte symbols: printable Latin-1 bytes first, then the other bytes in increasing order.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_order = printable + [byte for byte in range(256) if byte not in printable]
    byte_symbol = {byte: tokenizer.convert_ids_to_tokens(index) for index, byte in enumerate(byte_order)}
    rng = random.Random(0)
    # Characters whose letter/case tables differ between Python's regex module and the Rust tokenizers library.
    tricky = ["ſ", "\u0345", "\u0558", "\ua7cb", "\U00010d50", "'s", "'S", "&amp;", "<|endoftext|>", "!<|endoftext|>"]
    alphabet = [chr(code) for code in range(32, 127)] * 4 + tricky * 8
    alphabet += [chr(rng.randrange(0xA0, 0x3000)) for _ in range(200)]
    alphabet += [chr(rng.randrange(0x3000, 0xD800)) for _ in range(100)]
    alphabet += [chr(rng.randrange(0x10000, 0x30000)) for _ in range(100)]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(1500)]
    fast = tokenizer(texts, add_special_tokens=False, padding=False, truncation=False)["input_ids"]
    expected = [_reference_encode(text, vocab, ranks, byte_symbol) for text in texts]
    assert [text for text, ids, want in zip(texts, fast, expected) if ids != want] == []


def test_saved_directory_round_trip(tokenizer, reference, clip_tokenizer_dir):
    config = json.loads((clip_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_msclip.MSClipTokenizer"
    assert config["truncation_style"] == "keep_end"
    assert (clip_tokenizer_dir / "tokenization_msclip.py").is_file()
    fresh = build_msclip_tokenizer(VOCAB_PATH)
    texts = [case["text"] for case in reference["cases"]]
    assert tokenizer(texts)["input_ids"] == fresh(texts)["input_ids"]


def test_standalone_tokenizer_json_matches_on_clean_ascii(clip_tokenizer_dir, reference):
    # tokenizer.json works without this package (no ftfy/HTML cleaning there): check it on captions that need none.
    backend = Tokenizer.from_file(str(clip_tokenizer_dir / "tokenizer.json"))
    checked = 0
    for case in reference["cases"]:
        text = case["text"]
        needs_no_cleaning = text.isascii() and clean_caption(text) == " ".join(text.split()).lower()
        if not case["eot_kept"] or not needs_no_cleaning:
            continue
        assert backend.encode(text).ids == unpadded(case["tokenize_77"]), text
        checked += 1
    assert checked >= 30


def test_build_cli_refuses_to_overwrite(tmp_path):
    build_tokenizer_main = load_build_tokenizer_cli().main
    output = tmp_path / "tok"
    assert build_tokenizer_main(["--vocab", str(VOCAB_PATH), "--output", str(output)]) == 0
    assert MSClipTokenizer.from_pretrained(output)("a diagram")["input_ids"] == [START_ID, 320, 22697, END_ID]
    (output / "tokenizer.json").write_text("user data")
    assert build_tokenizer_main(["--vocab", str(VOCAB_PATH), "--output", str(output)]) == 2
    assert (output / "tokenizer.json").read_text() == "user data"
    assert build_tokenizer_main(["--vocab", str(VOCAB_PATH), "--output", str(output), "--overwrite"]) == 0
    assert MSClipTokenizer.from_pretrained(output)("a diagram")["input_ids"] == [START_ID, 320, 22697, END_ID]
    assert build_tokenizer_main(["--vocab", str(tmp_path / "missing.gz"), "--output", str(tmp_path / "x")]) == 2
