"""MS-CLIP tokenizer: OpenAI CLIP's byte-level BPE with the official MS-CLIP text cleaning.

The official tokenizer (``SimpleTokenizer`` in Hxyou/MSCLIP) cleans a caption with ``ftfy.fix_text``, unescapes HTML
twice, collapses whitespace, lowercases, splits the result with one regular expression and runs byte-level BPE on
every piece. Unicode tables differ between Python's ``str``, the ``regex`` module and the Rust ``tokenizers``
library, so this class does the cleaning and the splitting in Python, with the same libraries as the official
code, and hands the pieces to the fast Rust BPE as pre-split words. The ids are therefore the official ids for every
caption, and batches are still encoded (and padded) in Rust.

This file must only import the standard library, ``ftfy``, ``regex``, ``tokenizers`` and ``transformers``: it is
copied next to saved checkpoints and imported by ``trust_remote_code=True`` where ``modeling_msclip`` is absent.
"""

from __future__ import annotations

import gzip
import heapq
import html
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ftfy
import regex
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers.tokenization_utils_base import BatchEncoding, TruncationStrategy
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from transformers.utils import PaddingStrategy

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"
CONTEXT_LENGTH = 77
# The official code pads with 0 (the byte "!"), and the model pools at argmax(input_ids): the padding id must stay
# below the end-of-text id 49407, so the usual CLIP choice of padding with <|endoftext|> would break pooling.
PAD_TOKEN_ID = 0
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
# Every vocabulary here starts with the 256 byte symbols and the same 256 with "</w>", and ends with the two special
# tokens, so that any text can be encoded and the end token has the largest id.
NUM_BASE_TOKENS = 2 * 256 + 2

logger = logging.getLogger(__name__)
TRUNCATION_STYLES = ("keep_end", "official")

# The official splitting pattern, flags included; applied to cleaned, lowercased text.
CAPTION_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_CAPTION_SPLITTER = regex.compile(CAPTION_SPLIT_PATTERN, regex.IGNORECASE)
_WHITESPACE_RUN = regex.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Clean one caption exactly like the official ``whitespace_clean(basic_clean(text)).lower()``.

    Args:
        text: raw caption.

    Returns:
        The caption after ``ftfy.fix_text``, two rounds of HTML unescaping, whitespace collapsing and lowercasing.
    """
    if not isinstance(text, str):
        raise TypeError(f"A caption must be a str, got {type(text).__name__}: {text!r}")
    text = ftfy.fix_text(text)
    # Twice, as the official code does, so that doubly escaped entities such as "&amp;lt;" become "<".
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE_RUN.sub(" ", text).strip()
    return text.lower()


def split_caption(text: str) -> list[str]:
    """Clean a caption and split it into the pieces the official tokenizer runs BPE on.

    Args:
        text: raw caption.

    Returns:
        The list of pieces (words, single digits, punctuation runs, contractions and literal special tokens).
    """
    return _CAPTION_SPLITTER.findall(clean_caption(text))


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, as GPT-2 and CLIP do for byte-level BPE.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map to code points from 256 upwards.

    Returns:
        Dictionary from byte value (0-255) to a one-character string, in the official vocabulary order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    next_free = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + next_free)
            next_free += 1
    return {byte: chr(code_point) for byte, code_point in zip(byte_values, code_points)}


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The token-to-id dictionary of a CLIP-style BPE with ``merges``, in CLIP's id order.

    Ids run over the 256 byte symbols, the same 256 with ``</w>``, one token per merge (its two halves joined) and
    finally ``<|startoftext|>`` and ``<|endoftext|>``: pad id 0 is a byte, and the end token has the largest id, which
    is where the model pools text (``argmax(input_ids)``).

    Args:
        merges: BPE merges in rank order.

    Returns:
        The vocabulary: the 514 base entries and one for each distinct merged token.
    """
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + END_OF_WORD_SUFFIX for symbol in byte_symbols]
    # Two merges can make the same string ("ab"+"c", "a"+"bc"); the token keeps the id of the first.
    tokens += list(dict.fromkeys("".join(merge) for merge in merges))
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("a merge produces a byte symbol or a special token: this is not a valid BPE merge list")
    return vocab


def load_clip_bpe(vocab_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` and build the vocabulary and merge list from it.

    Args:
        vocab_path: path to the gzipped merges file shipped with CLIP and MS-CLIP.

    Returns:
        ``(vocab, merges)``: the 49408-entry token-to-id dictionary in official id order (256 bytes, 256 bytes with
        ``</w>``, one token per merge, then the two special tokens) and the 48894 merges in rank order.
    """
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary file not found: {vocab_path}")
    try:
        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{vocab_path} is not a gzipped UTF-8 CLIP merges file ({error})") from error
    # Line 0 is a version header; the official code keeps exactly the next NUM_MERGES lines.
    merge_lines = lines[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    if len(merges) != NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{vocab_path} does not hold {NUM_MERGES} two-symbol merges after its header line")
    vocab = clip_vocabulary(merges)
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{vocab_path} yields {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def load_clip_vocab_directory(directory: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read a transformers ``CLIPTokenizer`` / ``CLIPTokenizerFast`` directory (``vocab.json`` + ``merges.txt``).

    Such a directory is what a local copy of an ``openai/clip-vit-*`` repository holds; its ids are CLIP's.

    Args:
        directory: folder with ``vocab.json`` (token to id) and ``merges.txt`` (a ``#version`` line, then one
            merge per line).

    Returns:
        ``(vocab, merges)`` as ``load_clip_bpe`` returns them.

    Raises:
        FileNotFoundError: when either file is missing.
        ValueError: when the files do not describe a CLIP byte-level BPE whose end token has the largest id.
    """
    directory = Path(directory)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    for path in (vocab_file, merges_file):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a CLIP tokenizer directory: {path.name} is missing")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = []
    for number, line in enumerate(merges_file.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        merge = tuple(line.split())
        if len(merge) != 2:
            raise ValueError(f"{merges_file}:{number} is not a merge of two symbols: {line!r}")
        merges.append(merge)
    _check_clip_vocabulary(vocab, str(vocab_file))
    return vocab, merges


def _check_clip_vocabulary(vocab: dict[str, int], source: str) -> None:
    """Raise a ValueError unless ``vocab`` has CLIP's special tokens, the end token last and ids ``0..n-1``."""
    for token in (START_OF_TEXT, END_OF_TEXT):
        if token not in vocab:
            raise ValueError(f"{source} has no {token} token: it is not a CLIP vocabulary")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{source}: the token ids are not 0..{len(vocab) - 1}")
    if vocab[END_OF_TEXT] != len(vocab) - 1:
        raise ValueError(
            f"{source}: {END_OF_TEXT} has id {vocab[END_OF_TEXT]}, not the largest id {len(vocab) - 1}; MS-CLIP pools "
            "text at argmax(input_ids), so the end token must have the largest id"
        )


def _word_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each ``split_caption`` piece occurs in ``texts`` (literal special tokens left out)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece in split_caption(text) if piece not in (START_OF_TEXT, END_OF_TEXT))
    return counts


def train_clip_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-style BPE merges from captions, deterministically.

    The captions go through exactly the pipeline the tokenizer applies (``split_caption``: ftfy, HTML unescaping,
    lowercasing, the CLIP regular expression). Each distinct piece becomes a word of byte-level symbols whose last
    symbol carries ``</w>``, as CLIP's BPE starts from; then the most frequent adjacent pair (summed over words) is
    merged, again and again. Ties go to the smallest pair in string order, so the same captions always give the
    same merges (the ``tokenizers`` trainer breaks ties by hash order and does not). The vocabulary is laid out like
    CLIP's (``clip_vocabulary``), so every text still encodes (bytes are always in it) and the end token has the
    largest id.

    Args:
        texts: the captions (any iterable; read once).
        vocab_size: the vocabulary size wanted, special tokens included (at least 515: the 514 base tokens and one
            merge). A corpus with fewer pairs of ``min_frequency`` than that stops early, with a warning.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        ``(vocab, merges)`` as ``load_clip_bpe`` returns them.
    """
    if vocab_size <= NUM_BASE_TOKENS:
        raise ValueError(
            f"vocab_size must be more than {NUM_BASE_TOKENS} (256 bytes, 256 bytes with </w> and the start and end "
            f"tokens), got {vocab_size}"
        )
    num_merges = vocab_size - NUM_BASE_TOKENS
    byte_symbol = bytes_to_unicode()
    words: list[list[str]] = []
    frequencies: list[int] = []
    for piece, frequency in _word_counts(texts).items():
        symbols = [byte_symbol[b] for b in piece.encode("utf-8")]
        symbols[-1] += END_OF_WORD_SUFFIX
        words.append(symbols)
        frequencies.append(frequency)

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    words_with_pair: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += frequencies[index]
            words_with_pair[pair].add(index)
    # A max-heap on (count, smallest pair); entries whose count has changed since are skipped when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    new_tokens: set[str] = set()
    while heap and len(new_tokens) < num_merges:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -negative_count:
            continue
        if -negative_count < min_frequency:
            break
        merges.append(pair)
        new_tokens.add(pair[0] + pair[1])
        changed: set[tuple[str, str]] = set()
        for index in sorted(words_with_pair.pop(pair)):
            old = words[index]
            new = _merge_pair(old, pair)
            for old_pair in zip(old, old[1:]):
                pair_counts[old_pair] -= frequencies[index]
                changed.add(old_pair)
            for new_pair in zip(new, new[1:]):
                pair_counts[new_pair] += frequencies[index]
                words_with_pair[new_pair].add(index)
                changed.add(new_pair)
            for old_pair in set(zip(old, old[1:])) - set(zip(new, new[1:])):
                words_with_pair[old_pair].discard(index)
            words[index] = new
        for changed_pair in changed:
            count = pair_counts[changed_pair]
            if count > 0:
                heapq.heappush(heap, (-count, changed_pair))
            else:
                pair_counts.pop(changed_pair)
                words_with_pair.pop(changed_pair, None)
    if not merges:
        raise ValueError("no BPE merge could be learned: the captions are empty or every pair is below min_frequency")
    if len(new_tokens) < num_merges:
        logger.warning(
            "the captions give only %d merges (min_frequency=%d): the vocabulary has %d tokens, not %d",
            len(merges),
            min_frequency,
            len(new_tokens) + NUM_BASE_TOKENS,
            vocab_size,
        )
    return clip_vocabulary(merges), merges


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """``symbols`` with every non-overlapping occurrence of ``pair``, left to right, joined into one symbol."""
    merged, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def _post_processor(vocab: dict[str, int]) -> processors.PostProcessor:
    """Template that wraps a caption in start/end tokens (a pair, unused by MS-CLIP, gets a second end token)."""
    special = [(START_OF_TEXT, vocab[START_OF_TEXT]), (END_OF_TEXT, vocab[END_OF_TEXT])]
    return processors.TemplateProcessing(
        single=f"{START_OF_TEXT} $A:0 {END_OF_TEXT}",
        pair=f"{START_OF_TEXT} $A:0 {END_OF_TEXT} $B:1 {END_OF_TEXT}:1",
        special_tokens=special,
    )


def _use_presplit_pipeline(backend: Tokenizer) -> None:
    """Configure ``backend`` for the pieces ``split_caption`` produces: no normaliser, byte mapping only."""
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _use_standalone_pipeline(backend: Tokenizer) -> None:
    """Configure ``backend`` to take raw text on its own (what ``tokenizer.json`` holds for other tools).

    Rust approximates the official pipeline: it has no ftfy/HTML cleaning and its Unicode tables may be of another
    version than Python's, so only ``MSClipTokenizer`` guarantees the official ids.
    """
    backend.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("(?i)" + CAPTION_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_backend_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> Tokenizer:
    """Build the Rust BPE tokenizer for MS-CLIP (pre-split pipeline) from a vocabulary and merges.

    Args:
        vocab: token-to-id dictionary, see ``load_clip_bpe``.
        merges: merges in rank order.

    Returns:
        A ``tokenizers.Tokenizer`` that expects the pieces of ``split_caption`` as pre-tokenised words.
    """
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=list(merges),
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD_SUFFIX,
            fuse_unk=False,
            unk_token=END_OF_TEXT,
            dropout=None,
        )
    )
    _use_presplit_pipeline(backend)
    # The byte-level decoder turns symbols back into bytes; "</w>" marks word ends, decoded as a space like the
    # official SimpleTokenizer.decode (which keeps the trailing space).
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(END_OF_WORD_SUFFIX, " ")])
    backend.post_processor = _post_processor(vocab)
    return backend


def _strip_padding_after_end(token_ids: list[int], end_id: int, pad_id: int) -> list[int]:
    """Drop the run of padding ids that follows the last end-of-text token (real "!" ids elsewhere are kept)."""
    if end_id not in token_ids:
        return token_ids
    last_end = len(token_ids) - 1 - token_ids[::-1].index(end_id)
    if all(token_id == pad_id for token_id in token_ids[last_end + 1 :]):
        return token_ids[: last_end + 1]
    return token_ids


class MSClipTokenizer(TokenizersBackend):
    """Fast MS-CLIP tokenizer: official ids, start/end tokens, padding with id 0, context length 77.

    Calling the tokenizer defaults to ``padding="longest"`` (each batch padded on the right to its longest caption)
    and ``truncation=True`` at ``model_max_length`` (77). Over-length captions keep their end token by default
    (``truncation_style="keep_end"``: the first 75 caption ids between start and end); ``truncation_style="official"``
    reproduces the official rows, which keep the first 77 ids and lose the end token.

    Build it from the CLIP vocabulary with ``build_msclip_tokenizer``, train one on your captions with
    ``train_msclip_tokenizer`` (or ``train_new_from_iterator``), or load a saved one with ``from_pretrained``.

    Args:
        vocab: token-to-id dictionary (with ``merges``) when building from scratch; see ``load_clip_bpe``.
        merges: BPE merges in rank order.
        truncation_style: ``"keep_end"`` (default) or ``"official"``.
        model_max_length: context length, 77 for every MS-CLIP model.
        bos_token, eos_token, unk_token: special tokens; keep the defaults for MS-CLIP checkpoints.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"
    model = BPE
    # Saving writes `auto_map` and copies this file next to the checkpoint, so `trust_remote_code=True` can load it.
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        truncation_style: str = "keep_end",
        model_max_length: int = CONTEXT_LENGTH,
        bos_token: str = START_OF_TEXT,
        eos_token: str = END_OF_TEXT,
        unk_token: str = END_OF_TEXT,
        **kwargs: Any,
    ) -> None:
        _check_truncation_style(truncation_style)
        if kwargs.get("tokenizer_file") is None and kwargs.get("tokenizer_object") is None:
            if vocab is None or merges is None:
                raise ValueError(
                    "MSClipTokenizer needs `vocab` and `merges` (see build_msclip_tokenizer) or a saved tokenizer "
                    "directory (MSClipTokenizer.from_pretrained)"
                )
            self._tokenizer = build_backend_tokenizer(vocab, merges)
        # Padding uses id 0 without registering its token "!" as a special token: a registered "!" would be cut out
        # of captions ("wow!") and encoded differently from the official tokenizer.
        pad_token = kwargs.pop("pad_token", None)
        if pad_token is not None and str(pad_token) != "!":
            raise ValueError(
                f"MSClipTokenizer always pads with id 0 (token '!'), as the official code does; got pad_token="
                f"{str(pad_token)!r}. The model pools at argmax(input_ids), so padding must stay below the end id."
            )
        self.truncation_style = truncation_style
        super().__init__(
            truncation_style=truncation_style,
            model_max_length=model_max_length,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            **kwargs,
        )
        # A loaded tokenizer.json holds the stand-alone pipeline; encoding here always goes through split_caption.
        _use_presplit_pipeline(self._tokenizer)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Load a saved ``tokenizer.json`` as it is (rather than re-deriving it from its vocabulary and merges)."""
        tokenizer_file = kwargs.get("tokenizer_file")
        if tokenizer_file is not None and os.path.isfile(tokenizer_file):
            return kwargs
        return super().convert_to_native_format(trust_remote_code=trust_remote_code, **kwargs)

    @property
    def pad_token(self) -> str:
        """The padding token: the vocabulary entry with id 0, as in the official code (not a special token)."""
        return self._tokenizer.id_to_token(PAD_TOKEN_ID)

    @property
    def pad_token_id(self) -> int:
        """Id used for padding: 0, as in the official code; it must stay below the end-of-text id."""
        return PAD_TOKEN_ID

    def __call__(
        self,
        text: str | list[str] | None = None,
        text_pair: str | list[str] | None = None,
        text_target: str | list[str] | None = None,
        text_pair_target: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str | PaddingStrategy = "longest",
        truncation: bool | str | TruncationStrategy | None = True,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenise one caption or a batch of captions.

        Same arguments as ``PreTrainedTokenizerBase.__call__``, with MS-CLIP defaults: ``padding="longest"`` (pad on
        the right to the longest caption of the batch; ``"max_length"`` pads to 77 for static shapes) and
        ``truncation=True`` (cut at ``model_max_length``). ``truncation_style="keep_end"|"official"`` may be passed
        to override the tokenizer's setting for this call. ``pad_to_multiple_of=m`` rounds the padded width up to a
        multiple of ``m`` but never past the truncation length (77: the text tower has no position beyond it), so a
        batch whose longest caption has 75 ids is padded to 77 with ``m=8``.
        """
        multiple = kwargs.pop("pad_to_multiple_of", None)
        rounds = multiple is not None and padding not in (False, "do_not_pad", PaddingStrategy.DO_NOT_PAD)
        if rounds and multiple < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {multiple}")
        return_tensors = kwargs.pop("return_tensors", None)
        encoded = super().__call__(
            text,
            text_pair,
            text_target,
            text_pair_target,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=None if rounds else return_tensors,
            **kwargs,
        )
        if not rounds:
            return encoded
        rows = encoded["input_ids"] if encoded["input_ids"] and isinstance(encoded["input_ids"][0], list) else None
        width = max(len(row) for row in rows) if rows is not None else len(encoded["input_ids"])
        limit = max_length if max_length is not None else self.model_max_length
        target = min(-(-width // multiple) * multiple, max(limit, width))
        return self.pad(encoded, padding="max_length", max_length=target, return_tensors=return_tensors)

    def _encode_plus(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        truncation_style: str | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Clean and split the captions in Python, then encode the pieces with the Rust backend."""
        if text_pair is not None:
            raise ValueError("MSClipTokenizer encodes single captions; `text_pair` is not supported")
        if kwargs.pop("is_split_into_words", False):
            raise ValueError("MSClipTokenizer expects raw caption strings; `is_split_into_words=True` is not supported")
        if isinstance(text, (list, tuple)):
            if len(text) == 0:
                raise ValueError("Cannot tokenize an empty batch of captions")
            pieces: list[str] | list[list[str]] = [split_caption(caption) for caption in text]
        else:
            pieces = split_caption(text)
        style = truncation_style if truncation_style is not None else self.truncation_style
        _check_truncation_style(style)
        truncates = kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE)
        if style == "official" and truncates != TruncationStrategy.DO_NOT_TRUNCATE:
            return self._encode_with_official_truncation(pieces, **kwargs)
        return super()._encode_plus(pieces, is_split_into_words=True, **kwargs)

    def _encode_with_official_truncation(self, pieces: list[str] | list[list[str]], **kwargs: Any) -> BatchEncoding:
        """Reproduce the official rows: ``[start] + ids + [end]`` cut to its first ``max_length`` ids.

        The Rust truncation always keeps the end token, so encode with room for one more id, cut in Python, then
        pad. Fast-tokenizer extras (``encodings``, offsets, word ids) are not available in this mode.
        """
        max_length = kwargs["max_length"]
        padding_strategy = kwargs.pop("padding_strategy", PaddingStrategy.DO_NOT_PAD)
        return_tensors = kwargs.pop("return_tensors", None)
        pad_to_multiple_of = kwargs.pop("pad_to_multiple_of", None)
        padding_side = kwargs.pop("padding_side", None)
        return_attention_mask = kwargs.get("return_attention_mask")
        kwargs["max_length"] = max_length + 1
        if kwargs.get("return_offsets_mapping") or kwargs.get("return_overflowing_tokens"):
            raise ValueError("truncation_style='official' does not support offsets or overflowing tokens")
        encoded = super()._encode_plus(
            pieces, is_split_into_words=True, padding_strategy=PaddingStrategy.DO_NOT_PAD, return_tensors=None, **kwargs
        )
        batched = isinstance(encoded["input_ids"][0], list) if encoded["input_ids"] else False
        cut = {}
        for key, value in encoded.items():
            if key == "length":
                continue
            rows = value if batched else [value]
            rows = [row[:max_length] for row in rows]
            cut[key] = rows if batched else rows[0]
        if kwargs.get("return_length"):
            cut["length"] = [len(row) for row in cut["input_ids"]] if batched else len(cut["input_ids"])
        if not batched and return_tensors is not None:
            # Tensors always get a batch axis, as on the default path.
            cut = {key: [value] for key, value in cut.items()}
        return self.pad(
            cut,
            padding=padding_strategy,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            return_tensors=return_tensors,
        )

    def train_new_from_iterator(
        self,
        text_iterator: Iterable[str] | Iterable[list[str]],
        vocab_size: int,
        length: int | None = None,
        new_special_tokens: list[str] | None = None,
        special_tokens_map: dict[str, str] | None = None,
        min_frequency: int = 2,
        **kwargs: Any,
    ) -> MSClipTokenizer:
        """A new tokenizer of this kind with merges learned from ``text_iterator`` (see ``train_msclip_tokenizer``).

        Keeps this tokenizer's truncation style and context length. ``text_iterator`` may yield captions or lists of
        captions (batches), as in transformers. Extra special tokens are not supported: MS-CLIP has exactly two.
        """
        if new_special_tokens or special_tokens_map:
            raise ValueError("MSClipTokenizer has exactly two special tokens; new_special_tokens is not supported")
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")

        def captions() -> Iterator[str]:
            for item in text_iterator:
                yield from ([item] if isinstance(item, str) else item)

        return train_msclip_tokenizer(
            captions(),
            vocab_size,
            min_frequency=min_frequency,
            truncation_style=self.truncation_style,
            model_max_length=self.model_max_length,
        )

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Decode like the official ``SimpleTokenizer.decode``; with ``skip_special_tokens`` also drop the padding."""
        if skip_special_tokens and isinstance(token_ids, list):
            token_ids = _strip_padding_after_end(token_ids, self.eos_token_id, PAD_TOKEN_ID)
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike,
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        """Write ``tokenizer.json`` with the stand-alone pipeline and without per-call padding/truncation state."""
        standalone = Tokenizer.from_str(self._tokenizer.to_str())
        _use_standalone_pipeline(standalone)
        standalone.no_padding()
        standalone.no_truncation()
        tokenizer_file = os.path.join(
            str(save_directory), (filename_prefix + "-" if filename_prefix else "") + "tokenizer.json"
        )
        standalone.save(tokenizer_file)
        return file_names + (tokenizer_file,)


def _check_truncation_style(style: str) -> None:
    """Raise a ValueError naming the accepted values when ``style`` is not a known truncation style."""
    if style not in TRUNCATION_STYLES:
        raise ValueError(f"truncation_style must be one of {TRUNCATION_STYLES}, got {style!r}")


def build_msclip_tokenizer(source: str | os.PathLike, **kwargs: Any) -> MSClipTokenizer:
    """Build the MS-CLIP tokenizer from a CLIP vocabulary, wherever users have it, or load a saved one.

    Args:
        source: one of
            - OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (also shipped by the official MS-CLIP repository);
            - a transformers ``CLIPTokenizer`` / ``CLIPTokenizerFast`` directory (``vocab.json`` + ``merges.txt``,
              e.g. a local copy of an ``openai/clip-vit-*`` repository): the same ids as the file above;
            - a directory saved by ``MSClipTokenizer.save_pretrained`` (for example one trained with
              ``train_msclip_tokenizer``).
        **kwargs: passed to ``MSClipTokenizer`` (for example ``truncation_style="official"``).

    Returns:
        A ready ``MSClipTokenizer``; ``save_pretrained`` writes a directory that ``AutoTokenizer`` can load.
    """
    path = Path(source)
    if path.is_dir():
        config_file = path / "tokenizer_config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("tokenizer_class") == "MSClipTokenizer":
            return MSClipTokenizer.from_pretrained(path, **kwargs)
        if (path / "vocab.json").is_file() or (path / "merges.txt").is_file():
            vocab, merges = load_clip_vocab_directory(path)
            return MSClipTokenizer(vocab=vocab, merges=merges, **kwargs)
        raise FileNotFoundError(
            f"{path} holds neither a saved MSClipTokenizer (tokenizer_config.json naming MSClipTokenizer) nor a CLIP "
            "tokenizer (vocab.json + merges.txt)"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer source not found: {path} (give bpe_simple_vocab_16e6.txt.gz, a CLIP tokenizer directory with "
            "vocab.json + merges.txt, or a saved MSClipTokenizer directory)"
        )
    vocab, merges = load_clip_bpe(path)
    return MSClipTokenizer(vocab=vocab, merges=merges, **kwargs)


def train_msclip_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, **kwargs: Any
) -> MSClipTokenizer:
    """Train an MS-CLIP tokenizer on your own captions (a domain or non-English vocabulary, or a small one).

    The tokenizer works like the CLIP one in every respect but its merges (see ``train_clip_bpe``): the same
    cleaning and splitting, byte-level BPE with ``</w>`` marks, start/end tokens (the two largest ids), padding with
    id 0 and 77 positions. Set the model's ``text_config.vocab_size`` to ``len(tokenizer)`` and its
    ``bos_token_id`` / ``eos_token_id`` to the tokenizer's (``run_pretrain.py`` does so when it starts from a
    preset).

    Args:
        texts: the training captions (any iterable of strings; read once).
        vocab_size: vocabulary size wanted, special tokens included (more than 514).
        min_frequency: a pair must occur this often to be merged.
        **kwargs: passed to ``MSClipTokenizer`` (for example ``truncation_style``).

    Returns:
        The trained ``MSClipTokenizer``.
    """
    vocab, merges = train_clip_bpe(texts, vocab_size, min_frequency=min_frequency)
    return MSClipTokenizer(vocab=vocab, merges=merges, **kwargs)


__all__ = [
    "CONTEXT_LENGTH",
    "END_OF_TEXT",
    "PAD_TOKEN_ID",
    "START_OF_TEXT",
    "MSClipTokenizer",
    "build_msclip_tokenizer",
    "clean_caption",
    "clip_vocabulary",
    "load_clip_bpe",
    "load_clip_vocab_directory",
    "split_caption",
    "train_clip_bpe",
    "train_msclip_tokenizer",
]
