"""Every fenced ``bash`` and ``python`` block of README.md and docs/*.md runs, as written, at tiny size.

The convention lives in the docs themselves: an HTML comment on the line before a fence, invisible when the page is
rendered, says how the block is run here::

    <!-- docs-test: "--max_steps 400" -> "--max_steps 2"; "CKPT" -> "$CHECKPOINT"; given: data/shapes -->
    <!-- docs-test: skip: GPU only (--device cuda); the CPU commands above are the same benchmark -->
    <!-- docs-test: by: tests/test_finetune.py::test_the_documented_plain_trainer_recipe_runs -->

Clauses, separated by ``;``:

* ``"old" -> "new"``: a literal substitution (paths and sizes only). ``old`` must occur in the block, so a stale
  substitution fails. ``$NAME`` in ``new`` is one of the test's tiny inputs (`INPUTS`), e.g. ``$CHECKPOINT``.
* ``given: a, b``: tiny stand-ins for what the reader is expected to have, by the name the block uses: files and
  folders put into the page's working directory (``data/shapes``, ``bpe_simple_vocab_16e6.txt.gz``), or Python
  objects for a snippet's free names (``image``, ``captions``). `GIVEN` lists them.
* ``skip: reason``: not run (GPU-only, real multi-node, usage synopses); counted with its reason.
* ``by: tests/file.py::test_name``: run by that test, which also checks its results (the test must exist).
* ``note: text``: a word to the reader of the page source.

A block without a comment runs as written. The blocks of a page run in page order in one working directory (so a
command can use what an earlier one wrote, as a reader following the page would), its Python blocks in one
namespace; bash blocks run with ``bash -euo pipefail`` and the project's virtual environment first on ``PATH``.
The terminal summary (`pytest_terminal_summary` in conftest.py) lists ran / marked per page.
"""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REFERENCE = REPO.parent / "shared" / "reference" / "msclip_official"
RUNNABLE = ("bash", "python")
DIRECTIVE = re.compile(r"<!--\s*docs-test:(.*?)-->\s*$", re.S)
SUBSTITUTION = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"$')
# Tiny pre-training options, for "...same options..." in training.md: the page's commands without sizes.
TINY_PRETRAIN_OPTIONS = (
    "--model_preset msclip-s-tiny --tokenizer_name_or_path bpe_simple_vocab_16e6.txt.gz --train_data data/shapes "
    "--train_split train --per_device_train_batch_size 4 --max_steps 2 --logging_steps 1 --save_strategy no "
    "--report_to none --dataloader_num_workers 0"
)
SUMMARY: dict[str, dict[str, list[str]]] = {}  # page -> {"ran": [lines], "marked": ["line: reason"]}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    substitutions: list[tuple[str, str]] = field(default_factory=list)
    given: list[str] = field(default_factory=list)
    skip: str | None = None
    by: str | None = None
    has_directive: bool = False

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse_directive(text: str, where: str) -> dict:
    parsed: dict = {"substitutions": [], "given": [], "skip": None, "by": None}
    for clause in (c.strip() for c in re.split(r";\s*(?=\"|given:|skip:|by:|note:)", text.strip()) if c.strip()):
        if clause.startswith("skip:"):
            parsed["skip"] = clause[len("skip:") :].strip()
            assert parsed["skip"], f"{where}: 'skip:' needs a reason"
        elif clause.startswith("note:"):
            continue  # for the reader of the page source
        elif clause.startswith("by:"):
            parsed["by"] = clause[len("by:") :].strip()
        elif clause.startswith("given:"):
            parsed["given"] += [name.strip() for name in clause[len("given:") :].split(",") if name.strip()]
        else:
            match = SUBSTITUTION.match(clause)
            assert match, f'{where}: cannot read the docs-test clause {clause!r} (want "old" -> "new")'
            parsed["substitutions"].append(tuple(part.replace('\\"', '"') for part in match.groups()))
    return parsed


def extract_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` in a runnable language, with the docs-test comment right before it."""
    lines = page.read_text().split("\n")
    blocks, index = [], 0
    while index < len(lines):
        fence = re.match(r"^( *)```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        end = index + 1
        while not lines[end].strip().startswith("```"):
            end += 1
        if fence.group(2) in RUNNABLE:  # an indented fence (in a list item) holds indented code
            code = "\n".join(line[len(fence.group(1)) :] for line in lines[index + 1 : end]) + "\n"
            block = Block(page, index + 1, fence.group(2), code)
            start = index  # the comment right above the fence, however many lines it has
            if index > 0 and lines[index - 1].rstrip().endswith("-->"):
                start = index - 1
                while start > 0 and "<!--" not in lines[start]:
                    start -= 1
            directive = DIRECTIVE.search("\n".join(lines[start:index]))
            if directive:
                block.has_directive = True
                for key, value in parse_directive(directive.group(1), block.where).items():
                    setattr(block, key, value)
            blocks.append(block)
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in extract_blocks(page)]


def test_every_directive_is_well_formed():
    """Fast checks of the convention itself: substitutions that still apply, known inputs, existing tests."""
    problems = []
    for block in ALL_BLOCKS:
        for old, new in block.substitutions:
            if old not in block.code:
                problems.append(f"{block.where}: {old!r} no longer occurs in the block")
            for name in re.findall(r"\$([A-Z_]+)", new):
                if name not in INPUTS:
                    problems.append(f"{block.where}: unknown input ${name} (known: {sorted(INPUTS)})")
        for name in block.given:
            if name not in GIVEN:
                problems.append(f"{block.where}: unknown given {name!r} (known: {sorted(GIVEN)})")
        if block.by:
            file, test = re.match(r"([\w/.]+)::(\w+)", block.by).groups()
            if not (REPO / file).is_file() or f"def {test}(" not in (REPO / file).read_text():
                problems.append(f"{block.where}: {block.by} does not exist")
    for page in PAGES:  # a comment that is not right above a fence steers nothing
        attached = sum(1 for block in ALL_BLOCKS if block.page == page and block.has_directive)
        if len(re.findall(r"^\s*<!--\s*docs-test:", page.read_text(), re.M)) != attached:
            problems.append(f"{page.relative_to(REPO)}: a docs-test comment is not on the lines right above a fence")
    assert not problems, "\n".join(problems)
    assert len(ALL_BLOCKS) > 30  # the extraction found the pages' blocks


# ---------------------------------------------------------------------------------------------- tiny inputs


def _synthetic_clip_merges() -> list[tuple[str, str]]:
    """48,894 distinct two-symbol merges over CLIP's byte alphabet: a vocabulary file of the official format and size
    (49,408 tokens) whose merges are meaningless, because the real file is not part of this repository."""
    from modeling_msclip.tokenization_msclip import NUM_MERGES, bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = [(a, b) for a in alphabet for b in alphabet]
    merges += [(a, b + "</w>") for a in alphabet for b in alphabet]
    return merges[:NUM_MERGES]


def write_clip_vocab_file(path: Path) -> None:
    lines = ["#version: synthetic, for the docs test", *(" ".join(merge) for merge in _synthetic_clip_merges())]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))


def write_clip_tokenizer_folder(folder: Path) -> None:
    from modeling_msclip.tokenization_msclip import clip_vocabulary

    merges = _synthetic_clip_merges()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(merges)))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def run_script(*arguments: str, cwd: Path) -> None:
    subprocess.run([sys.executable, *arguments], cwd=cwd, check=True, capture_output=True, text=True)


class TinyInputs:
    """Built once per session, on first use, in one folder; `path` returns a built input's location."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self.built:
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            BUILDERS[name](self, target)
            self.built[name] = target
        return self.built[name]


def _vocab(inputs: TinyInputs, target: Path) -> None:
    write_clip_vocab_file(target)


def _checkpoint(inputs: TinyInputs, target: Path) -> None:
    import torch

    from modeling_msclip import MSClipConfig, MSClipModel
    from modeling_msclip.image_processing_msclip import MSClipImageProcessor
    from modeling_msclip.processing_msclip import MSClipProcessor
    from modeling_msclip.tokenization_msclip import build_msclip_tokenizer

    torch.manual_seed(0)
    MSClipModel(MSClipConfig.from_preset("msclip-s-tiny")).save_pretrained(target)
    tokenizer = build_msclip_tokenizer(inputs.path("bpe_simple_vocab_16e6.txt.gz"))
    MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=64), tokenizer).save_pretrained(target)


def _shapes(inputs: TinyInputs, target: Path) -> None:
    run_script(
        "processing/make_shapes_dataset.py", "--output", str(target), "--num-train", "16", "--num-validation", "4",
        "--num-test", "10", "--image-size", "32", cwd=REPO,
    )  # fmt: skip


def _fashion_mnist_idx(inputs: TinyInputs, target: Path) -> None:
    """The four Fashion-MNIST idx files (random 28x28 images, labels 0-9 in turn), as Debian's package has them."""
    import numpy as np

    from processing.fashion_mnist import IDX_FILES

    def idx(array: np.ndarray) -> bytes:
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        return gzip.compress(header + array.astype(np.uint8).tobytes())

    target.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 20)):
        image_stem, label_stem = IDX_FILES[split]
        (target / f"{image_stem}.gz").write_bytes(idx(rng.integers(0, 256, (count, 28, 28))))
        (target / f"{label_stem}.gz").write_bytes(idx(np.arange(count) % 10))


def _fashion_mnist(inputs: TinyInputs, target: Path) -> None:
    idx = inputs.path("fashion-mnist-idx")
    run_script("processing/fashion_mnist.py", "--input-dir", str(idx), "--output", str(target), cwd=REPO)


def _class_folders(split: str):
    def build(inputs: TinyInputs, target: Path) -> None:
        shutil.copytree(inputs.path("data/fashion-mnist") / split, target, ignore=shutil.ignore_patterns("*.jsonl"))

    return build


def _class_folder_splits(inputs: TinyInputs, target: Path) -> None:
    """``train/`` and ``test/`` of class folders and nothing else (no metadata table, no classes.json)."""
    for split in ("train", "test"):
        _class_folders(split)(inputs, target / split)


def _captions(inputs: TinyInputs, target: Path) -> None:
    shutil.copytree(inputs.path("data/fashion-mnist") / "test", target)


def _shards(inputs: TinyInputs, target: Path) -> None:
    """Two webdataset shards of 8 shapes pairs each, named 000000.tar and 000001.tar."""
    run_script(
        "processing/write_webdataset.py", "--input", str(inputs.path("data/shapes")), "--split", "train",
        "--output", str(target), "--samples-per-shard", "8", cwd=REPO,
    )  # fmt: skip


def _renamed_shards(digits: int):
    def build(inputs: TinyInputs, target: Path) -> None:
        """The shards of `_shards` with ``digits``-digit names (the docs' brace patterns have 4 or 5 digits)."""
        target.mkdir()
        for shard in sorted(inputs.path("shards").glob("*.tar")):
            shutil.copy(shard, target / f"{int(shard.stem):0{digits}d}.tar")

    return build


def _pairs_csv(inputs: TinyInputs, target: Path) -> None:
    images = target.parent / "pairs-images"
    shutil.copytree(inputs.path("data/fashion-mnist") / "test" / "bag", images)
    rows = ["image,text", *(f"{images.name}/{p.name},a photo of a bag" for p in sorted(images.glob("*.png")))]
    target.write_text("\n".join(rows) + "\n")


def _captions_jsonl(inputs: TinyInputs, target: Path) -> None:
    words = ["red", "green", "blue", "circle", "square", "star", "small", "large", "photo", "of", "a"]
    target.write_text("".join(json.dumps({"text": f"a photo of a {w} {v}"}) + "\n" for w in words for v in words))


def _image_file(inputs: TinyInputs, target: Path) -> None:
    shutil.copy(next((inputs.path("data/fashion-mnist") / "test").glob("*/*.png")), target)


def _transformers_clip(inputs: TinyInputs, target: Path) -> None:
    write_clip_tokenizer_folder(target)


class NeedsReference(Exception):
    """An input made from the official reference data, which exists here and in CI but not on a user's machine."""


def _official_checkpoint(inputs: TinyInputs, target: Path) -> None:
    """The tiny official MS-CLIP-S weights of the reference data, as the official training code saves them."""
    import torch
    from safetensors.torch import load_file

    if not REFERENCE.is_dir():
        raise NeedsReference(f"needs the official reference data, absent here: {REFERENCE}")
    state = load_file(REFERENCE / "msclip_s_tiny" / "state_dict.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, target)


def _official_config(inputs: TinyInputs, target: Path) -> None:
    import yaml

    if not REFERENCE.is_dir():
        raise NeedsReference(f"needs the official reference data, absent here: {REFERENCE}")
    target.write_text(
        yaml.safe_dump(json.loads((REFERENCE / "msclip_s_tiny" / "config.json").read_text())["merged_official_config"])
    )


def _transformers_clip_model(inputs: TinyInputs, target: Path) -> None:
    from conftest import build_tiny_transformers_clip

    model, tokenizer, image_processor = build_tiny_transformers_clip(["a", "photo", "of", "dog", "cat"])
    tokenizer.bos_token, tokenizer.eos_token = "[BOS]", "[EOS]"  # as CLIP's tokenizer names its own
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(target)


def _open_clip_checkpoint(inputs: TinyInputs, target: Path) -> None:
    from safetensors.torch import save_file
    from test_convert_open_clip import random_checkpoint

    state = random_checkpoint(77)
    state["token_embedding.weight"] = state["token_embedding.weight"].new_zeros(
        49408, state["token_embedding.weight"].shape[1]
    )
    save_file(state, target)  # with the embedding rows of the vocabulary the command passes


def _open_clip_config(inputs: TinyInputs, target: Path) -> None:
    from test_convert_open_clip import model_config

    config = model_config(77, quick_gelu=False)
    config["text_cfg"]["vocab_size"] = 49408  # the vocabulary the command passes
    target.write_text(json.dumps(config))


BUILDERS = {
    "bpe_simple_vocab_16e6.txt.gz": _vocab,
    "checkpoint": _checkpoint,
    "data/shapes": _shapes,
    "fashion-mnist-idx": _fashion_mnist_idx,
    "data/fashion-mnist": _fashion_mnist,
    "data/val_by_class": _class_folders("test"),
    "data/train_by_class": _class_folders("train"),
    "data/test_by_class": _class_folders("test"),
    "data/captions": _captions,
    "data/classes": _class_folder_splits,
    "shards": _shards,
    "data/shards": _shards,
    "laion": _renamed_shards(5),
    "cc12m": _renamed_shards(4),
    "cc3m": _renamed_shards(5),
    "pairs.csv": _pairs_csv,
    "captions.jsonl": _captions_jsonl,
    "path/to/image.png": _image_file,
    "path/to/clip-vit-base-patch32": _transformers_clip,
    "ckpt.pth": _official_checkpoint,
    "b32-yfcc-msclips.yaml": _official_config,
    "my-transformers-clip": _transformers_clip_model,
    "open_clip_model.safetensors": _open_clip_checkpoint,
    "ViT-B-32.json": _open_clip_config,
}
# $NAME in a substitution: the input's absolute path.
INPUTS = {"CHECKPOINT": "checkpoint", "FASHION_MNIST_IDX": "fashion-mnist-idx"}
# Text-valued inputs.
TEXT_INPUTS = {"TINY_PRETRAIN_OPTIONS": lambda: TINY_PRETRAIN_OPTIONS, "FREE_PORT": lambda: str(free_port())}
INPUTS.update(dict.fromkeys(TEXT_INPUTS))


def _pil_image(inputs: TinyInputs):
    from PIL import Image

    return Image.open(inputs.path("path/to/image.png")).convert("RGB")


def _tokenizer(inputs: TinyInputs):
    from modeling_msclip.tokenization_msclip import build_msclip_tokenizer

    return build_msclip_tokenizer(inputs.path("bpe_simple_vocab_16e6.txt.gz"))


def _caption_list(inputs: TinyInputs):
    return [json.loads(line)["text"] for line in inputs.path("captions.jsonl").read_text().splitlines()]


def _clip_tokenizer(inputs: TinyInputs):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(inputs.path("path/to/clip-vit-base-patch32"))


def _collator(inputs: TinyInputs):
    from modeling_msclip.collators_msclip import ImageTextCollator
    from modeling_msclip.image_processing_msclip import MSClipImageProcessor

    image_processor = MSClipImageProcessor.from_preset("msclip", image_size=32)
    return ImageTextCollator(_tokenizer(inputs), image_processor)


OBJECTS = {
    "image": _pil_image,
    "pil_image": _pil_image,
    "tokenizer": _tokenizer,
    "captions": _caption_list,
    "batches_of_captions": lambda inputs: [_caption_list(inputs)],
    "clip_tokenizer": _clip_tokenizer,
    "collator": _collator,
    "rank": lambda inputs: 0,
    "world_size": lambda inputs: 1,
    "epochs": lambda inputs: 2,
}
GIVEN = set(BUILDERS) | set(OBJECTS)


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> TinyInputs:
    return TinyInputs(tmp_path_factory.mktemp("docs_inputs"))


# ---------------------------------------------------------------------------------------------- running


def prepared_code(block: Block, inputs: TinyInputs) -> str:
    code = block.code
    for old, new in block.substitutions:
        for name in sorted(set(re.findall(r"\$([A-Z_]+)", new)), key=len, reverse=True):
            value = TEXT_INPUTS[name]() if name in TEXT_INPUTS else str(inputs.path(INPUTS[name]))
            new = new.replace(f"${name}", value)
        code = code.replace(old, new)
    return code


def give(block: Block, inputs: TinyInputs, workdir: Path, namespace: dict) -> None:
    for name in block.given:
        if name in OBJECTS:
            namespace[name] = OBJECTS[name](inputs)
            continue
        target = workdir / name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = inputs.path(name)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)


def run_bash(code: str, workdir: Path, where: str) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
        f"{where} failed ({result.returncode}):\n{code}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )


def run_python(code: str, namespace: dict, workdir: Path, where: str) -> None:
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        exec(compile(code, where, "exec"), namespace)
    finally:
        os.chdir(previous)


def page_workdir(tmp_path: Path) -> Path:
    """A working directory in which the repository's folders are where the docs' relative paths expect them."""
    for name in ("training", "processing", "configuration", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


PAGES_WITH_BLOCKS = sorted({block.page for block in ALL_BLOCKS})


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=[str(p.relative_to(REPO)) for p in PAGES_WITH_BLOCKS])
def test_the_page_runs_as_written(page, tiny_inputs, tmp_path):
    blocks = [block for block in ALL_BLOCKS if block.page == page]
    record = SUMMARY.setdefault(str(page.relative_to(REPO)), {"ran": [], "marked": []})
    workdir, namespace = page_workdir(tmp_path), {"__name__": "__docs__"}
    for block in blocks:
        if block.skip or block.by:
            record["marked"].append(f"{block.line}: {' '.join((block.skip or 'run by ' + block.by).split())}")
            continue
        try:
            give(block, tiny_inputs, workdir, namespace)
        except NeedsReference as absent:
            record["marked"].append(f"{block.line}: {absent}")
            continue
        code = prepared_code(block, tiny_inputs)
        if block.language == "bash":
            run_bash(code, workdir, block.where)
        else:
            run_python(code, namespace, workdir, block.where)
        record["ran"].append(str(block.line))
