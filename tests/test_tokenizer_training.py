"""Tokenizers that need no download: trained on one's own captions, or CLIP's from where users have it.

The trained tokenizer is checked against properties that do not come from our own code: a plain Python BPE over the
learned merges, exact decoding of the cleaned caption, and the save/load paths of transformers' Auto classes. The
CLIP vocabulary from ``bpe_simple_vocab_16e6.txt.gz`` and from a transformers ``vocab.json`` + ``merges.txt`` folder
is checked against the official tokenizer ids (those tests need the reference data).
"""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import CLIP_VOCAB, REFERENCE_DIR, TOKENIZER_CORPUS, needs_reference
from transformers import AutoProcessor, AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from modeling_msclip import MSClipConfig, MSClipImageProcessor, MSClipProcessor, MSClipTokenizer
from modeling_msclip.pretraining_msclip import build_model, build_model_config
from modeling_msclip.tokenization_msclip import (
    END_OF_WORD_SUFFIX,
    build_msclip_tokenizer,
    bytes_to_unicode,
    load_clip_bpe,
    split_caption,
    train_clip_bpe,
    train_msclip_tokenizer,
)
from processing.shapes_dataset import ShapesConfig, write_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 580
CAPTIONS = ["a small red circle", "There is a large blue star on the left!", "zebra crossing, 42 cafés"]


def load_build_tokenizer_cli():
    """Import processing/build_tokenizer.py by path (processing/ is a script folder, not an installed package)."""
    spec = importlib.util.spec_from_file_location("build_tokenizer", REPO_ROOT / "processing" / "build_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Textbook BPE of one word: byte symbols, end-of-word mark on the last, merge the lowest-ranked pair first."""
    symbols = [bytes_to_unicode()[b] for b in piece.encode("utf-8")]
    symbols[-1] += END_OF_WORD_SUFFIX
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


@pytest.fixture(scope="module")
def trained() -> MSClipTokenizer:
    return train_msclip_tokenizer(TOKENIZER_CORPUS, VOCAB_SIZE)


def test_trained_vocabulary_has_the_clip_layout(trained):
    assert len(trained) == VOCAB_SIZE
    # Bytes first (pad id 0 is "!"), then the merges, then the two special tokens with the largest ids.
    assert (trained.pad_token_id, trained.bos_token_id, trained.eos_token_id) == (0, VOCAB_SIZE - 2, VOCAB_SIZE - 1)
    assert trained.convert_ids_to_tokens([0, 256, VOCAB_SIZE - 2, VOCAB_SIZE - 1]) == [
        "!",
        "!" + END_OF_WORD_SUFFIX,
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    # Words the corpus repeats are single tokens.
    assert trained("a small green picture")["input_ids"] == [VOCAB_SIZE - 2] + trained.convert_tokens_to_ids(
        ["a</w>", "small</w>", "green</w>", "picture</w>"]
    ) + [VOCAB_SIZE - 1]


def test_merges_follow_the_textbook_example_and_are_deterministic():
    # Sennrich et al.'s example, worked by hand: pair counts over the words, ties to the smaller pair in string order
    # (e+s and s+t</w> both occur 9 times; e+w, n+e and w+est</w> 6 times; then ew+est</w> before n+ew).
    corpus = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    _, merges = train_clip_bpe(corpus, 514 + 7)
    assert merges == [
        ("e", "s"),
        ("es", "t</w>"),
        ("l", "o"),
        ("e", "w"),
        ("ew", "est</w>"),
        ("n", "ewest</w>"),
        ("lo", "w</w>"),
    ]
    # The same captions always give the same tokenizer (the tokenizers trainer breaks ties in hash order).
    assert all(
        train_clip_bpe(TOKENIZER_CORPUS, VOCAB_SIZE) == train_clip_bpe(TOKENIZER_CORPUS, VOCAB_SIZE) for _ in "ab"
    )


def test_trained_ids_equal_a_plain_python_bpe_over_the_learned_merges(trained):
    vocab, merges = train_clip_bpe(TOKENIZER_CORPUS, VOCAB_SIZE)
    assert len(merges) == VOCAB_SIZE - 514
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    for caption in TOKENIZER_CORPUS[::97] + CAPTIONS:
        expected = [vocab[symbol] for piece in split_caption(caption) for symbol in plain_bpe(piece, ranks)]
        assert trained.encode(caption, add_special_tokens=False) == expected, caption


def test_any_text_encodes_and_decodes_to_its_cleaned_pieces(trained):
    for caption in CAPTIONS + ["日本語のキャプション 🙂", "&amp;lt;b&amp;gt; tags"]:
        ids = trained(caption)["input_ids"]
        assert max(ids) == ids[-1] == trained.eos_token_id, caption  # the model pools at argmax(input_ids)
        assert trained.decode(ids, skip_special_tokens=True) == " ".join(split_caption(caption)) + " ", caption


def test_trained_tokenizer_round_trips_through_auto_classes(trained, tmp_path):
    trained.save_pretrained(tmp_path / "tokenizer")
    processor = MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=32), trained)
    processor.save_pretrained(tmp_path / "processor")
    expected = trained(CAPTIONS)
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
        build_msclip_tokenizer(tmp_path / "tokenizer"),
        AutoProcessor.from_pretrained(tmp_path / "processor").tokenizer,
    ):
        assert type(loaded) is MSClipTokenizer
        assert len(loaded) == VOCAB_SIZE
        assert loaded(CAPTIONS)["input_ids"] == expected["input_ids"]
        assert loaded(CAPTIONS)["attention_mask"] == expected["attention_mask"]


def test_train_new_from_iterator_takes_batches_and_keeps_the_settings(trained):
    batches = [TOKENIZER_CORPUS[i : i + 100] for i in range(0, len(TOKENIZER_CORPUS), 100)]
    official_style = train_msclip_tokenizer(TOKENIZER_CORPUS, 560, truncation_style="official")
    retrained = official_style.train_new_from_iterator(iter(batches), VOCAB_SIZE)
    assert retrained.truncation_style == "official"
    assert retrained(CAPTIONS)["input_ids"] == trained(CAPTIONS)["input_ids"]
    with pytest.raises(ValueError, match="exactly two special tokens"):
        trained.train_new_from_iterator(TOKENIZER_CORPUS, VOCAB_SIZE, new_special_tokens=["<mask>"])


def test_training_errors_and_small_corpora(caplog):
    with pytest.raises(ValueError, match="vocab_size must be more than 514"):
        train_msclip_tokenizer(TOKENIZER_CORPUS, 514)
    with pytest.raises(ValueError, match="no BPE merge could be learned"):
        train_msclip_tokenizer(["", "   "], 600)
    with caplog.at_level(logging.WARNING, logger="modeling_msclip.tokenization_msclip"):
        small = train_msclip_tokenizer(["a red circle"] * 3, 600)
    assert "the vocabulary has" in caplog.text
    assert len(small) == small.eos_token_id + 1 < 600


def test_build_tokenizer_cli_trains_from_any_dataset_format(tmp_path, capsys):
    cli = load_build_tokenizer_cli()
    table = tmp_path / "captions.jsonl"
    table.write_text("".join(json.dumps({"image": "x.png", "caption": text}) + "\n" for text in TOKENIZER_CORPUS))
    assert cli.main(["--train-from", str(table), "--vocab-size", str(VOCAB_SIZE), "--output", str(tmp_path / "a")]) == 0
    from_table = MSClipTokenizer.from_pretrained(tmp_path / "a")
    assert (
        from_table(CAPTIONS)["input_ids"] == train_msclip_tokenizer(TOKENIZER_CORPUS, VOCAB_SIZE)(CAPTIONS)["input_ids"]
    )
    # A table of captions alone (no image column), as docs/processor.md's command reads: the same tokenizer.
    only_captions = tmp_path / "only_captions.jsonl"
    only_captions.write_text("".join(json.dumps({"text": text}) + "\n" for text in TOKENIZER_CORPUS))
    arguments = ["--train-from", str(only_captions), "--vocab-size", str(VOCAB_SIZE), "--output", str(tmp_path / "t")]
    assert cli.main(arguments) == 0
    assert MSClipTokenizer.from_pretrained(tmp_path / "t")(CAPTIONS)["input_ids"] == from_table(CAPTIONS)["input_ids"]

    shapes = tmp_path / "shapes"
    write_shapes_dataset(shapes, num_train=40, num_validation=2, num_test=2, config=ShapesConfig(image_size=32))
    captions = [json.loads(line)["text"] for line in (shapes / "train" / "metadata.jsonl").read_text().splitlines()]
    arguments = ["--train-from", str(shapes), "--split", "train", "--vocab-size", "530", "--output"]
    assert cli.main([*arguments, str(tmp_path / "b")]) == 0
    assert (
        MSClipTokenizer.from_pretrained(tmp_path / "b")(captions[:5])["input_ids"]
        == train_msclip_tokenizer(captions, 530)(captions[:5])["input_ids"]
    )

    assert cli.main(["--train-from", str(table), "--output", str(tmp_path / "c")]) == 2
    assert "--train_from needs --vocab_size" in capsys.readouterr().err
    assert cli.main([*arguments, str(tmp_path / "b")]) == 2  # refuses to overwrite
    assert cli.main(["--train-from", str(tmp_path / "none.jsonl"), "--vocab-size", "600", "--output", "x"]) == 2


def test_a_preset_takes_the_tokenizer_vocabulary_and_a_checkpoint_must_cover_it(trained, tmp_path):
    model = build_model(build_model_config(preset="msclip-tiny"), tokenizer=trained)
    assert model.msclip.text_model.embeddings.token_embedding.num_embeddings == VOCAB_SIZE
    assert (model.config.text_config.bos_token_id, model.config.text_config.eos_token_id) == (578, 579)
    inputs = trained(CAPTIONS, return_tensors="pt")
    with torch.no_grad():
        features = model.msclip.get_text_features(**inputs).pooler_output
    assert features.shape == (3, model.config.projection_dim) and torch.isfinite(features).all()

    small = MSClipConfig.from_preset("msclip-tiny")
    small.text_config.vocab_size = 100
    from modeling_msclip import MSClipForPreTraining

    MSClipForPreTraining(small).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="the tokenizer has 580 tokens but the checkpoint's text embedding only 100"):
        small_checkpoint = str(tmp_path / "small")
        build_model(build_model_config(checkpoint=small_checkpoint), checkpoint=small_checkpoint, tokenizer=trained)


# ------------------------------------------------------------------------------ CLIP's vocabulary, official ids


def write_transformers_clip_folder(folder: Path) -> None:
    """Lay out CLIP's vocabulary as transformers' CLIP tokenizer folders hold it (vocab.json, merges.txt)."""
    vocab, merges = load_clip_bpe(CLIP_VOCAB)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


@pytest.fixture(scope="module")
def official_cases() -> list[dict]:
    return json.loads((REFERENCE_DIR / "tokenizer" / "tokenizer_reference.json").read_text(encoding="utf-8"))["cases"]


@needs_reference
def test_clip_vocabulary_from_the_gz_file_and_a_transformers_folder_gives_the_official_ids(tmp_path, official_cases):
    folder = tmp_path / "clip-vit-base-patch32"
    write_transformers_clip_folder(folder)
    # The folder is a real transformers CLIP tokenizer: transformers' own classes read it and agree on plain text.
    # transformers' CLIP tokenizer cleans text differently (no ftfy or HTML unescaping): plain captions only.
    plain = [
        c for c in official_cases if c["eot_kept"] and c["text"].isascii() and c["text"].replace(" ", "").isalnum()
    ]
    assert len(plain) >= 10
    for transformers_class in (CLIPTokenizer, CLIPTokenizerFast):
        theirs = transformers_class.from_pretrained(folder)
        for case in plain:
            assert theirs(case["text"])["input_ids"] == [49406, *case["encode"], 49407], case["text"]

    for tokenizer in (build_msclip_tokenizer(CLIP_VOCAB), build_msclip_tokenizer(folder)):
        assert len(tokenizer) == 49408
        for case in official_cases:
            assert tokenizer.encode(case["text"], add_special_tokens=False) == case["encode"], case["text"]
            if case["eot_kept"]:
                assert tokenizer(case["text"], padding="max_length")["input_ids"] == case["tokenize_77"], case["text"]


@needs_reference
def test_build_tokenizer_cli_takes_a_transformers_clip_folder(tmp_path, official_cases):
    folder = tmp_path / "clip"
    write_transformers_clip_folder(folder)
    assert load_build_tokenizer_cli().main(["--vocab", str(folder), "--output", str(tmp_path / "out")]) == 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert [saved.encode(c["text"], add_special_tokens=False) for c in official_cases] == [
        c["encode"] for c in official_cases
    ]


def test_clip_folder_errors_name_the_problem(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    with pytest.raises(FileNotFoundError, match="merges.txt is missing"):
        build_msclip_tokenizer(folder)
    (folder / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="merges.txt:2 is not a merge of two symbols"):
        build_msclip_tokenizer(folder)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1, "<|startoftext|>": 2}))
    with pytest.raises(ValueError, match="must have the largest id"):
        build_msclip_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match="tokenizer source not found"):
        build_msclip_tokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(FileNotFoundError, match="holds neither a saved MSClipTokenizer"):
        build_msclip_tokenizer(tmp_path)


def test_pad_to_multiple_of_rounds_up_but_never_past_the_context(msclip_tokenizer_dir):
    """docs/processor.md's ``pad_to_multiple_of=8`` used to fail: "truncation length (77) is not a multiple of 8"."""
    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    short = ["a red cat", "a photo of a blue dog on the left"]
    widths = [len(row) for row in tokenizer(short, padding=False)["input_ids"]]
    encoded = tokenizer(short, pad_to_multiple_of=8, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == -(-max(widths) // 8) * 8 > max(widths)
    assert encoded["attention_mask"].sum(1).tolist() == widths  # padding is masked, the ids are unchanged
    plain = tokenizer(short, return_tensors="pt")["input_ids"]
    assert torch.equal(encoded["input_ids"][:, : plain.shape[1]], plain)
    long = tokenizer(["a red cat " * 40], pad_to_multiple_of=8, return_tensors="pt")["input_ids"]
    assert long.shape == (1, 77)  # 80 would index past the 77 positions of the text tower
    assert tokenizer(short, padding="max_length", pad_to_multiple_of=8, return_tensors="pt")["input_ids"].shape[1] == 77
    assert (
        tokenizer("a red cat", pad_to_multiple_of=4)["input_ids"]
        == tokenizer("a red cat", padding="max_length", max_length=8)["input_ids"][:8]
    )
    processor = MSClipProcessor(
        image_processor=MSClipImageProcessor.from_preset("msclip", image_size=32), tokenizer=tokenizer
    )
    assert processor(text=short, pad_to_multiple_of=8, return_tensors="pt")["input_ids"].shape[1] == 16
    with pytest.raises(ValueError, match="positive"):
        tokenizer(short, pad_to_multiple_of=0)
