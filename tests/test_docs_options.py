"""Every option of every command line is documented on the command's page, and the pages' commands use only real
options.

Commands are discovered: every ``.py`` file of training/, processing/, benchmarks/ and modeling_msclip/ with an
``if __name__ == "__main__":`` block is one. Files of training/ and processing/ run as ``python <file>``, the packages'
modules as ``python -m <module>``. `PAGES` maps each command to the page (optionally ``page#heading-anchor``, GitHub's
anchor of a heading: that heading's section with its sub-sections) where its options are documented; a command
missing from `PAGES` fails `test_every_command_has_a_documentation_page`.

The options are read from the real ``--help`` of each command, run in the repository root. To keep this test fast
(a few seconds instead of a torch import per command), one interpreter runs every command's ``--help`` as
``python FILE`` / ``python -m MODULE`` would (`HELP_RUNNER`); a test checks that it prints what separate processes
print. An option is documented when it appears literally (``--name``) in code in its page section: an inline code
span (tables included) or a fenced code block; HTML comments do not count. Required: the first option string of
every argument and its aliases (``--vocab``), except the dash spelling HfArgumentParser adds to each underscore name
(``--model-preset`` for ``--model_preset``). Options of transformers' `TrainingArguments` are transformers'
documentation: for a command whose options include all of them, exactly the option strings of
``HfArgumentParser(TrainingArguments)`` (computed here) are left out. Options of the project's own
`TrainingArguments` subclass (`MSClipTrainingArguments`) and of `OutputArguments` are not among them.

The reverse check: an option written after a command in a fenced shell block of any page must be one the command
accepts (a renamed option fails); ``...same options...`` placeholders and ``#`` comments are not options.
"""

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND_FOLDERS = ("training", "processing", "benchmarks", "modeling_msclip")
MODULE_FOLDERS = ("benchmarks", "modeling_msclip")  # run as `python -m folder.name`, the others as files
MAIN_GUARD = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.M)

# Command (its file) -> the page, or page#anchor of a heading, that documents its options.
PAGES = {
    "training/run_pretrain.py": "docs/training.md#what-a-run-needs",
    "training/run_finetune_classification.py": "docs/finetuning.md#fine-tuning",
    "training/run_evaluation.py": "docs/finetuning.md#evaluation-command",
    "training/run_diagnostics.py": "docs/evaluation.md#diagnostics",
    "training/demo.py": "README.md#what-make-demo-does-and-what-it-reaches",
    "processing/build_tokenizer.py": "docs/processor.md#building-the-tokenizer",
    "processing/fashion_mnist.py": "docs/data.md#fashion-mnist-recipe",
    "processing/make_shapes_dataset.py": "docs/data.md#the-embedded-dataset-procedural-shapes",
    "processing/write_webdataset.py": "docs/data.md#writing-webdataset-shards",
    "modeling_msclip/convert_clip.py": "docs/model.md#numerical-parity-with-the-official-code",
    "modeling_msclip/convert_open_clip.py": "docs/model.md#numerical-parity-with-the-official-code",
    "modeling_msclip/convert_original_msclip.py": "docs/model.md#numerical-parity-with-the-official-code",
    "modeling_msclip/convert_to_clip.py": "docs/model.md#numerical-parity-with-the-official-code",
    "benchmarks/run.py": "docs/benchmarks.md",
    "benchmarks/ddp_find_unused.py": (
        "docs/benchmarks.md#ddp---ddp_find_unused_parameters-true-vs-the-default-false-2-ranks"
    ),
    "benchmarks/scaling.py": "docs/scaling.md",
    "benchmarks/scaling_worker.py": "docs/scaling.md#measured-ddp-zero-2-and-zero-3-on-one-machine",
}
ALL_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
SHELL_LANGUAGES = ("bash", "sh", "shell")


def discovered_commands() -> list[str]:
    files = [path for folder in COMMAND_FOLDERS for path in sorted((REPO / folder).glob("*.py"))]
    return [str(path.relative_to(REPO)) for path in files if MAIN_GUARD.search(path.read_text())]


def invocation(command: str) -> list[str]:
    """The arguments after ``python`` that run ``command``."""
    folder = command.split("/")[0]
    return ["-m", command.removesuffix(".py").replace("/", ".")] if folder in MODULE_FOLDERS else [command]


# Runs the commands' ``--help`` one after the other in one interpreter, each as ``python FILE --help`` /
# ``python -m MODULE --help`` would (``__main__``, sys.argv, sys.path[0]), so that torch and transformers are imported
# once instead of once per command. `test_the_shared_interpreter_prints_what_the_commands_print` compares it with
# real separate processes.
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback

results = {}
for arguments in json.loads(sys.argv[1]):
    out, err, saved_path, saved_argv = io.StringIO(), io.StringIO(), list(sys.path), list(sys.argv)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if arguments[0] == "-m":
                sys.argv, sys.path[0] = ["-m", "--help"], os.getcwd()
                runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv, sys.path[0] = [arguments[0], "--help"], os.path.dirname(os.path.abspath(arguments[0]))
                runpy.run_path(arguments[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        code = 1
        err.write(traceback.format_exc())
    finally:
        sys.path[:], sys.argv = saved_path, saved_argv
    results[" ".join(arguments)] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""
HELP_ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHON_COLORS": "0", "HF_HUB_OFFLINE": "1"}


def run_python(arguments: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``python *arguments`` in the repository root, with the help environment, output captured."""
    return subprocess.run(
        [sys.executable, *arguments], cwd=REPO, env=HELP_ENV, capture_output=True, text=True, timeout=timeout
    )


def help_texts(commands: list[str]) -> dict[str, str]:
    """``--help`` of each command, all run by one `HELP_RUNNER` process in the repository root."""
    invocations = [invocation(command) for command in commands]
    result = run_python(["-c", HELP_RUNNER, json.dumps(invocations)], timeout=300)
    assert result.returncode == 0, f"the --help runner failed:\n{result.stderr[-3000:]}"
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    texts = {}
    for command, arguments in zip(commands, invocations):
        output = outputs[" ".join(arguments)]
        assert output["returncode"] == 0, f"python {' '.join(arguments)} --help failed:\n{output['stderr'][-3000:]}"
        texts[command] = output["stdout"]
    return texts


def real_help_text(command: str) -> str:
    """``--help`` of ``command`` run as its own process, as a user runs it."""
    result = run_python([*invocation(command), "--help"], timeout=120)
    assert result.returncode == 0, f"python {' '.join(invocation(command))} --help failed:\n{result.stderr[-3000:]}"
    return result.stdout


def options_from_help(text: str) -> list[tuple[str, ...]]:
    """The long option strings of each argument in an argparse ``--help``, one tuple per argument (primary first)."""
    entries, in_options = [], False
    for line in text.splitlines():
        if re.fullmatch(r"(options|optional arguments):", line):
            in_options = True  # below the description; argument groups follow this section
        elif in_options and (invocation_part := re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)):
            if strings := tuple(OPTION.findall(invocation_part.group(1))):
                entries.append(strings)
    return entries


@cache
def help_options() -> dict[str, list[tuple[str, ...]]]:
    return {command: options_from_help(text) for command, text in help_texts(list(PAGES)).items()}


@cache
def training_arguments_options() -> frozenset[str]:
    """Every option string that HfArgumentParser makes of transformers' own `TrainingArguments`."""
    from transformers import HfArgumentParser, TrainingArguments

    return frozenset(s for action in HfArgumentParser(TrainingArguments)._actions for s in action.option_strings)


def own_options(command: str) -> dict[str, list[str]]:
    """The options ``command`` itself defines: primary option string -> the strings that must be documented."""
    entries = help_options()[command]
    given = {s for entry in entries for s in entry}
    transformers_options = {s for s in training_arguments_options() if s.startswith("--")}
    embeds_training_arguments = transformers_options <= given
    own = {}
    for entry in entries:
        if entry[0] == "--help" or (embeds_training_arguments and set(entry) <= transformers_options):
            continue
        own[entry[0]] = [s for s in entry if s == entry[0] or s != entry[0].replace("_", "-")]
    return own


# ---------------------------------------------------------------------------------------------- pages


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def page_lines(page: str) -> tuple[tuple[str, bool], ...]:
    """The lines of ``page`` with, for each, whether it lies inside a fenced code block (fence lines count as in)."""
    lines, in_fence = [], False
    for line in (REPO / page).read_text().split("\n"):
        if FENCE.match(line):
            lines.append((line, True))
            in_fence = not in_fence
        else:
            lines.append((line, in_fence))
    return tuple(lines)


def section_lines(target: str) -> tuple[tuple[str, bool], ...]:
    """The lines of ``page`` or of ``page#anchor``'s section (its heading to the next heading of its level or above)."""
    page, _, anchor = target.partition("#")
    lines = page_lines(page)
    if not anchor:
        return lines
    seen: dict[str, int] = {}
    for index, (line, in_fence) in enumerate(lines):
        heading = None if in_fence else HEADING.match(line)
        if not heading:
            continue
        slug = github_anchor(heading.group(2))
        slug, seen[slug] = (f"{slug}-{seen[slug]}" if slug in seen else slug), seen.get(slug, 0) + 1
        if slug == anchor:
            level, end = len(heading.group(1)), len(lines)
            for later in range(index + 1, len(lines)):
                other = None if lines[later][1] else HEADING.match(lines[later][0])
                if other and len(other.group(1)) <= level:
                    end = later
                    break
            return lines[index:end]
    raise AssertionError(f"{page} has no heading with the anchor #{anchor}")


def code_text(target: str) -> str:
    """The code of a page section: fenced blocks and inline code spans, without HTML comments."""
    lines = section_lines(target)
    fenced = "\n".join(line for line, in_fence in lines if in_fence and not FENCE.match(line))
    prose = "\n".join("" if in_fence else line for line, in_fence in lines)
    prose = re.sub(r"<!--.*?-->", "", prose, flags=re.S)
    spans = [match.group(2) for match in re.finditer(r"(`+)(.+?)\1", prose, flags=re.S)]
    return fenced + "\n" + "\n".join(spans)


def heading_of(target: str) -> str:
    page, _, anchor = target.partition("#")
    return f"{page}, section '{HEADING.match(section_lines(target)[0][0]).group(2)}'" if anchor else page


def shell_commands(page: Path) -> list[tuple[int, str]]:
    """The logical lines (backslash continuations joined, comments removed) of the page's fenced shell blocks."""
    commands, language, current, start = [], None, "", 0
    for number, line in enumerate(page.read_text().split("\n"), 1):
        fence = FENCE.match(line)
        if fence:
            language = None if language is not None else (line.strip().lstrip("`~").strip() or "")
            continue
        if language not in SHELL_LANGUAGES:
            continue
        start = start or number
        current += re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append((start, current))
        current, start = "", 0
    return commands


# ---------------------------------------------------------------------------------------------- tests


def test_every_command_has_a_documentation_page():
    found = discovered_commands()
    problems = [
        f'{command} has a command line (an `if __name__ == "__main__":` block) but no documentation page: document '
        f"its options (what each does, its default, its values) on the page where the command is described and add "
        f"it to PAGES in tests/test_docs_options.py"
        for command in found
        if command not in PAGES
    ]
    problems += [
        f"PAGES names {command}, which is no command (any more): remove it" for command in PAGES if command not in found
    ]
    for target in PAGES.values():
        section_lines(target)  # the page and the heading exist
    assert not problems, "\n".join(problems)


def test_every_option_is_documented_on_its_page():
    problems = []
    for command, target in PAGES.items():
        assert help_options()[command], f"no options read from the --help of {command}"  # --help at least
        own = own_options(command)
        code = code_text(target)
        missing = [
            option
            for strings in own.values()
            for option in strings
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", code)
        ]
        if missing:
            problems.append(
                f"{command}: document {', '.join(missing)} in {heading_of(target)} (what it does, default, values; "
                f"as `--option` in code: backticks, a table or a code block)"
            )
    assert not problems, "Undocumented options:\n" + "\n".join(problems)


def test_every_command_has_one_option_style():
    # Underscores, as HfArgumentParser and transformers' TrainingArguments spell them, with the dashed spelling as an
    # alias of the same argument (so `--zero-shot-data` of earlier releases keeps working).
    problems = []
    for command, entries in help_options().items():
        for entry in entries:
            primary = entry[0]
            if "-" in primary[2:]:
                problems.append(f"{command}: {primary} is spelled with dashes (use --{primary[2:].replace('-', '_')})")
            elif "_" in primary and primary.replace("_", "-") not in entry:
                problems.append(f"{command}: {primary} has no dashed alias {primary.replace('_', '-')}")
    assert not problems, "\n".join(problems)


def test_the_pages_commands_use_only_real_options():
    """Options written after a command in a fenced shell block of any page must be options that command accepts."""
    accepted = {command: {s for entry in entries for s in entry} for command, entries in help_options().items()}
    callers = {
        command: re.compile(
            rf"(?<![\w./-])(?:\./)?{re.escape(command)}(?![\w.])"
            rf"|(?<![\w-])-m\s+{re.escape(command.removesuffix('.py').replace('/', '.'))}(?![\w.])"
        )
        for command in PAGES
    }
    problems, checked = [], 0
    for page in ALL_PAGES:
        for line, text in shell_commands(page):
            for command, caller in callers.items():
                for call in caller.finditer(text):
                    arguments = re.split(r"\s(?:\|\|?|&&|;|&)(?:\s|$)|;", text[call.end() :], maxsplit=1)[0]
                    for option in OPTION.findall(arguments):
                        checked += 1
                        if option not in accepted[command]:
                            problems.append(
                                f"{page.relative_to(REPO)}:{line}: {command} has no option {option} "
                                f"(renamed or removed? see its --help)"
                            )
    assert not problems, "\n".join(problems)
    assert checked > 50  # the pages' commands were found


def test_the_shared_interpreter_prints_what_the_commands_print():
    """`HELP_RUNNER` prints the very ``--help`` of a real process, for a file and a module command that start fast
    (all commands agreed byte for byte when this test was written)."""
    commands = ["training/demo.py", "benchmarks/ddp_find_unused.py"]
    for command, text in help_texts(commands).items():
        assert text == real_help_text(command), command
