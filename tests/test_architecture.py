"""The layering of the code (docs/architecture.md): the library imports no entry script, has no import cycle (imports
inside functions included) and parses no command line, except the `convert_*` modules, which transformers keeps
beside a model as scripts (``python -m modeling_msclip.convert_...``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_msclip"
COMMAND_LINE_NAMES = ("argparse", "HfArgumentParser", "sys.argv")


def module_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports anywhere in its body."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    imported.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
                elif node.module and node.module.split(".")[0] == "modeling_msclip":
                    parts = node.module.split(".")
                    imported.update(parts[1:2] or [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("modeling_msclip."))
        graph[path.stem] = (imported & modules) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                return [*path[path.index(neighbour) :], neighbour]
            if neighbour not in state:
                found = visit(neighbour, [*path, neighbour])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_library_has_no_import_cycle():
    graph = module_imports()
    assert "evaluation_callback_msclip" in graph["pretraining_msclip"]  # the walk sees function-level imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The files of the data and evaluation layers, bottom to top (docs/architecture.md): each imports only those before it.
LAYER_FILES = {
    "data": [
        "records_msclip",
        "transforms_msclip",
        "collators_msclip",
        "webdataset_msclip",
        "data_msclip",
        "streaming_msclip",
    ],
    "evaluation": [
        "metrics_msclip",
        "encoding_msclip",
        "evaluation_msclip",
        "evaluation_callback_msclip",
        "diagnostics_msclip",
    ],
}


@pytest.mark.parametrize("layer", sorted(LAYER_FILES))
def test_the_files_of_a_layer_import_only_the_files_below_them(layer):
    graph = module_imports()
    files = LAYER_FILES[layer]
    assert set(files) <= set(graph)
    upward = {module: sorted(set(graph[module]) & set(files[index + 1 :])) for index, module in enumerate(files)}
    assert not any(upward.values()), upward


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_library_parses_no_command_line_and_imports_no_script():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        if "import training" in text or "from training" in text:
            offenders.append(f"{path.name} imports an entry script")
        if path.stem.startswith("convert_"):
            continue
        offenders += [f"{path.name} uses {name}" for name in COMMAND_LINE_NAMES if name in text]
    assert offenders == []


def test_the_library_defines_no_argument_dataclass_of_a_script():
    # The scripts own their arguments; the library's only ones extend transformers' TrainingArguments (the trainer's
    # options are part of the trainer, as in transformers).
    allowed = {"MSClipTrainingArguments", "OutputArguments"}
    defined = {
        f"{path.name}:{node.name}"
        for path in sorted(PACKAGE.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name.endswith("Arguments") and node.name not in allowed
    }
    assert defined == set()
