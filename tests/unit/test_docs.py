"""The docs are tested like code: every command, flag, config key, repository path, make target and link named in
README.md and docs/*.md exists.

What counts as what:

- a command is `launch/<script>.py` inside code (a code span or a fenced block, continuation lines joined); its
  `--flags` are the words after the script up to the end of the command (`#`, `;`, `&&`, `|`, `&`), checked against
  the flags the script's own `--help` lists (for `launch/bench.py NAME`, the help of that benchmark);
- a config key is a dotted name in code whose first part is a section of `RootConfig` (`optim.lr`,
  `eval.datasets.<name>.root`, `methods.cvsi.*_weight`), unless it is a file name (`index.json`, `model.safetensors`),
  a module of the repository (`cluster.root_config`) or a call (`logging.getLogger(`);
- a repository path starts with one of the repository's top-level folders (`configs/vith.yaml`, `training/checkpoint/`);
  run outputs (`runs/`, `data/`, `<storage>/...`, `.venv/`) start elsewhere and are not checked;
- a make target is the word after `make` where `make` starts a command in code;
- a link is a markdown link to a file of the repository, with its `#anchor` when it has one.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
REPO_FOLDERS = ("cluster", "training", "shards", "launch", "configs", "tests", "docs")
FILE_SUFFIXES = {
    "json", "jsonl", "yaml", "yml", "py", "safetensors", "txt", "md", "png", "jpg", "jpeg", "tar", "faiss", "npy",
    "pt", "html", "toml", "csv", "log", "gz",
}  # fmt: skip
"""A dotted name ending in one of these is a file name, not a config key (`index.json`, `model.safetensors`)."""
README_MAX_LINES = 200

COMMAND_END = re.compile(r"\s#|;|&&|\|\||(?<!\\)\|(?!\|)|\s&(?:\s|$)")
LAUNCH = re.compile(r"(?<![\w./-])launch/([\w-]+)\.py\b")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
DOTTED = re.compile(r"(?<![\w./$<>*-])([A-Za-z_]\w*(?:\.(?:[\w*]+|<[\w-]+>))+)")
PATH = re.compile(rf"(?<![\w./<>$~-])((?:{'|'.join(REPO_FOLDERS)})/[\w./*<>{{}}-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


# --- reading a markdown file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """One piece of code: a logical line of a fenced block (continuations joined) or an inline code span."""

    line: int
    text: str


class Doc:
    def __init__(self, name: str, text: str, directory: Path) -> None:
        self.name = name
        self.text = text
        self.directory = directory
        self.lines = text.splitlines()
        self._line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self.code, self.prose = self._split()

    def line_of(self, offset: int) -> int:
        return bisect.bisect_right(self._line_starts, offset)

    def _split(self) -> tuple[list[Code], str]:
        """Fenced blocks as logical lines, and the rest (prose, with fenced lines blanked) with its code spans."""
        code: list[Code] = []
        prose_lines: list[str] = []
        fence: str | None = None
        pending: tuple[int, str] | None = None
        for number, line in enumerate(self.lines, start=1):
            marker = re.match(r"\s*(`{3,}|~{3,})", line)
            if fence is None and marker:
                fence = marker.group(1)
                prose_lines.append("")
                continue
            if fence is not None:
                prose_lines.append("")
                if line.strip().startswith(fence):
                    fence = None
                    continue
                start, head = pending if pending else (number, "")
                if line.rstrip().endswith("\\"):  # a continuation: the command goes on on the next line
                    pending = (start, head + line.rstrip()[:-1] + " ")
                else:
                    pending = None
                    code.append(Code(start, head + line))
                continue
            prose_lines.append(line)
        prose = "\n".join(prose_lines)
        for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, re.S):
            code.append(Code(self.line_of(match.start()), " ".join(match.group(2).split())))
        return code, prose


# --- what the repository offers ----------------------------------------------------------------------------------


HELP_RUNNER = """
import contextlib, importlib.util, io, json, sys, traceback
repo, texts = sys.argv[1], {}
for script, benchmark in json.loads(sys.argv[2]):
    path, out = f"{repo}/launch/{script}.py", io.StringIO()
    sys.argv = [path]
    try:
        with contextlib.redirect_stdout(out):
            spec = importlib.util.spec_from_file_location(f"docs_launch_{script}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.main(([benchmark] if benchmark else []) + ["--help"])
    except SystemExit:
        pass
    except Exception:
        out.write("help failed:\\n" + traceback.format_exc())
    texts[json.dumps([script, benchmark])] = out.getvalue()
print(json.dumps(texts))
"""
"""Prints `launch/<script>.py [benchmark] --help` of every pair given, in one process: the scripts share their
imports (torch, open_clip), so the docs' dozen scripts and benchmarks cost one interpreter start, not twenty."""

_HELP: dict[tuple[str, str | None], str] = {}


def _run_helps(pairs: set[tuple[str, str | None]]) -> None:
    missing = sorted(pairs - _HELP.keys(), key=str)
    if not missing:
        return
    done = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, str(REPO_ROOT), json.dumps(missing)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the --help runner failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    for key, text in json.loads(done.stdout).items():
        script, benchmark = json.loads(key)
        _HELP[(script, benchmark)] = text


@functools.cache
def _documented_commands() -> frozenset[tuple[str, str | None]]:
    """(script, the word after it) of every existing `launch/<script>.py` in the docs' code."""
    found = set()
    for path in DOCS:
        for code in Doc(path.name, path.read_text(), path.parent).code:
            for match in LAUNCH.finditer(code.text):
                if (REPO_ROOT / "launch" / f"{match.group(1)}.py").is_file():
                    words = code.text[match.end() :].split()
                    found.add((match.group(1), words[0] if words else None))
    return frozenset(found)


def script_help(script: str, benchmark: str | None = None) -> str:
    """The help text of `launch/<script>.py [benchmark] --help`; the first call runs every script the docs name."""
    if (script, benchmark) not in _HELP:
        if benchmark is None:
            _run_helps({(script, None)} | {(name, None) for name, _ in _documented_commands()})
        else:
            documented = {(name, word) for name, word in _documented_commands() if name == script}
            _run_helps(
                {(script, benchmark)} | {(name, w) for name, w in documented if w in subcommands(script_help(name))}
            )
    text = _HELP[(script, benchmark)]
    if not text.startswith("usage:"):
        raise RuntimeError(f"launch/{script}.py {benchmark or ''} --help printed no usage:\n{text[-2000:]}")
    return text


def parser_flags(help_text: str) -> set[str]:
    """The options an argparse help lists: those of the usage line and of every option line."""
    usage = help_text.split("\n\n", 1)[0]
    flags = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", usage)) | {"-h", "--help"}
    for line in help_text.splitlines():
        invocation = re.match(r"\s{2}(-\S.*?)(?:\s{2,}|$)", line)
        if invocation:
            flags |= set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", invocation.group(1)))
    return flags


def subcommands(help_text: str) -> set[str]:
    """The choices of a subcommand argument in the usage line (`{loader,step,...}`)."""
    choices = re.search(r"\{([\w,-]+)\}", help_text.split("\n\n", 1)[0])
    return set(choices.group(1).split(",")) if choices else set()


@functools.cache
def script_flags(script: str, benchmark: str | None = None) -> frozenset[str]:
    """The flags `launch/<script>.py [benchmark]` accepts: its parser's, plus any its main() tests in argv itself
    (`launch/eval.py --list` answers before the parser runs)."""
    source = (REPO_ROOT / "launch" / f"{script}.py").read_text()
    handled = set(re.findall(r"""["'](--[\w-]+)["']\s+in\s+argv""", source))
    return frozenset(parser_flags(script_help(script, benchmark)) | handled)


@functools.cache
def make_targets() -> frozenset[str]:
    makefile = (REPO_ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile, re.M))


@dataclass
class Node:
    """A config node: a section with named children, a mapping that takes any key, or a value."""

    children: dict[str, Node] | None = None
    any_key: bool = False
    item: Node | None = None
    """A list's element schema: numeric parts (`data.sources.0.path`) step into it."""


@functools.cache
def config_schema() -> Node:
    """The root config's tree, from the schema itself; `eval.datasets` holds each registered benchmark's settings."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from cluster.root_config import RootConfig
    from training.evaluation.benchmarks import BENCHMARKS

    def node_of(config) -> Node:
        if isinstance(config, ListConfig):
            element = config._metadata.element_type
            return Node(item=node_of(OmegaConf.structured(element)) if is_dataclass(element) else Node())
        if not isinstance(config, DictConfig):
            return Node()
        if config._metadata.object_type in (dict, None):
            return Node(any_key=True)
        return Node({str(key): node_of(config._get_node(key)) for key in config.keys()})

    root = node_of(OmegaConf.structured(RootConfig))
    datasets = {name: Node({field.name: Node() for field in fields(b.settings)}) for name, b in BENCHMARKS}
    root.children["eval"].children["datasets"] = Node(datasets)
    return root


def key_exists(node: Node, parts: list[str]) -> bool:
    """Whether `parts` names a key below `node`; `<name>` and `*` parts match any child, `*_weight` a pattern."""
    if not parts:
        return True
    if node.any_key:
        return True
    head, rest = parts[0], parts[1:]
    if node.item is not None:
        return head.isdigit() and key_exists(node.item, rest)
    if node.children is None:
        return False
    if re.fullmatch(r"<[\w-]+>|\*", head):
        return any(key_exists(child, rest) for child in node.children.values())
    if "*" in head:
        return any(key_exists(child, rest) for key, child in node.children.items() if fnmatch.fnmatchcase(key, head))
    return head in node.children and key_exists(node.children[head], rest)


# --- the checks --------------------------------------------------------------------------------------------------


def check_commands(doc: Doc) -> list[Problem]:
    problems = []
    for code in doc.code:
        for match in LAUNCH.finditer(code.text):
            script = match.group(1)
            where = f"launch/{script}.py"
            if not (REPO_ROOT / where).is_file():
                problems.append(Problem(doc.name, code.line, f"`{where}`: no such script"))
                continue
            rest = code.text[match.end() :]
            rest = rest[: end.start()] if (end := COMMAND_END.search(rest)) else rest
            rest = rest.split("launch/", 1)[0]  # another command starts
            words = rest.split()
            benchmark = None
            choices = subcommands(script_help(script))
            if choices and words and re.fullmatch(r"[a-z][\w-]*", words[0]):
                if words[0] not in choices:
                    known = ", ".join(sorted(choices))
                    problems.append(Problem(doc.name, code.line, f"`{where} {words[0]}`: no such subcommand ({known})"))
                    continue
                benchmark = words[0]
            accepted = script_flags(script, benchmark)
            shown = f"{where} {benchmark}" if benchmark else where
            for flag in FLAG.findall(rest):
                if flag not in accepted:
                    problems.append(Problem(doc.name, code.line, f"`{shown}` has no flag `{flag}`"))
    return problems


def config_keys(text: str) -> list[str]:
    """The dotted names in `text` that mean a config key (see the module docstring)."""
    sections = config_schema().children
    found = []
    for match in DOTTED.finditer(text):
        name = match.group(1)
        parts = name.split(".")
        after = text[match.end() : match.end() + 1]
        if parts[0] not in sections or after in ("/", "("):
            continue
        if parts[-1].lower() in FILE_SUFFIXES:
            continue
        if (REPO_ROOT / Path(*parts)).with_suffix(".py").is_file() or (REPO_ROOT / Path(*parts)).is_dir():
            continue  # a module of the repository, not a key
        found.append(name)
    return found


def check_config_keys(doc: Doc) -> list[Problem]:
    problems = []
    for code in doc.code:
        for name in config_keys(code.text):
            if not key_exists(config_schema(), name.split(".")):
                problems.append(Problem(doc.name, code.line, f"`{name}`: no such config key in RootConfig"))
    return problems


def check_paths(doc: Doc) -> list[Problem]:
    problems = []
    for match in PATH.finditer(doc.text):
        path = match.group(1).rstrip(".,:;")
        pattern = re.sub(r"<[\w-]+>|\{[\w-]+\}", "*", path)
        exists = bool(list(REPO_ROOT.glob(pattern.rstrip("/")))) if "*" in pattern else (REPO_ROOT / path).exists()
        if not exists:
            problems.append(Problem(doc.name, doc.line_of(match.start()), f"`{path}`: no such path in the repository"))
    return problems


def check_make_targets(doc: Doc) -> list[Problem]:
    problems = []
    for code in doc.code:
        text = re.split(r"\s#", " " + code.text, maxsplit=1)[0]
        for command in re.split(r"&&|\|\||;|\|", text):
            words = command.split()
            while words and (words[0] == "time" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0])):
                words = words[1:]
            if len(words) >= 2 and words[0] == "make" and not words[1].startswith("-"):
                if words[1] not in make_targets():
                    problems.append(Problem(doc.name, code.line, f"`make {words[1]}`: no such target in the Makefile"))
    return problems


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings (outside fenced blocks)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if re.match(r"\s*```", line):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6}\s+(.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def check_links(doc: Doc) -> list[Problem]:
    problems = []
    for match in LINK.finditer(doc.prose):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.directory / path).resolve() if path else None
        line = doc.line_of(match.start())
        if file is not None and not file.exists():
            problems.append(Problem(doc.name, line, f"link `{target}`: no such file"))
        elif anchor:
            text = file.read_text() if file is not None else doc.text
            if anchor not in heading_anchors(text):
                problems.append(Problem(doc.name, line, f"link `{target}`: no heading with that anchor"))
    return problems


CHECKS = (check_commands, check_config_keys, check_paths, check_make_targets, check_links)


def check(doc: Doc) -> list[Problem]:
    return [problem for one_check in CHECKS for problem in one_check(doc)]


# --- the docs as they are ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_command_flag_key_path_target_and_link_exists(path: Path) -> None:
    name = str(path.relative_to(REPO_ROOT))
    problems = check(Doc(name, path.read_text(), path.parent))
    assert not problems, f"{len(problems)} false statement(s) in {name}:\n" + "\n".join(map(str, problems))


def test_readme_is_a_front_page_with_a_map_of_docs() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    lines = readme.count("\n") + (not readme.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"
    for command in ("make demo", "make test", "make test-fast"):
        assert f"`{command}`" in readme or f"{command} " in readme, f"README.md does not name `{command}`"
    unlinked = [p.name for p in DOCS[1:] if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"README.md's map of docs/ does not link {unlinked}"


# --- the checker catches a false line ----------------------------------------------------------------------------


def problems_in(text: str) -> list[str]:
    return [str(problem) for problem in check(Doc("fake.md", text, REPO_ROOT / "docs"))]


def test_a_missing_script_is_reported() -> None:
    assert problems_in("Run `python launch/nope.py --config tiny`.") == [
        "fake.md:1: `launch/nope.py`: no such script",
        "fake.md:1: `launch/nope.py`: no such path in the repository",
    ]


def test_an_unknown_flag_is_reported_per_script_and_benchmark() -> None:
    text = "\n".join(
        [
            "```bash",
            "python launch/train.py --config configs/tiny.yaml \\",
            "    --no-such-flag optim.lr=2e-5   # --comment-flag is not checked",
            "python launch/bench.py gpu --seconds 3",
            "python launch/bench.py nope --seconds 3",
            "python launch/eval.py --list",
            "```",
        ]
    )
    assert problems_in(text) == [
        "fake.md:2: `launch/train.py` has no flag `--no-such-flag`",
        "fake.md:4: `launch/bench.py gpu` has no flag `--seconds`",  # the loader benchmark's flag, not gpu's
        "fake.md:5: `launch/bench.py nope`: no such subcommand (build, eval, gpu, index, loader, step)",
    ]


def test_an_unknown_config_key_is_reported_and_file_names_are_not_keys() -> None:
    text = (
        "Set `optim.nope=1`, `eval.datasets.cirr.nope`, `methods.<name>.nope`, `data.sources.0.nope` and"
        " `data.sources.x.path`; `optim.lr=2e-5`, `data.sources.0.trees`,"
        " `eval.datasets.<name>.root`, `methods.cvsi.*_weight` and `serve.*` exist; `index.json`,"
        " `model.safetensors`, `launch/train.py`, `cluster.root_config` and `logging.getLogger(__name__)` are no keys."
    )
    assert problems_in(text) == [
        "fake.md:1: `optim.nope`: no such config key in RootConfig",
        "fake.md:1: `eval.datasets.cirr.nope`: no such config key in RootConfig",
        "fake.md:1: `methods.<name>.nope`: no such config key in RootConfig",
        "fake.md:1: `data.sources.0.nope`: no such config key in RootConfig",
        "fake.md:1: `data.sources.x.path`: no such config key in RootConfig",
    ]


def test_a_missing_repository_path_is_reported_and_run_outputs_are_not_checked() -> None:
    text = "See training/nope/ and `configs/nope.yaml`;\n`training/checkpoint/`, runs/demo/x and <storage>/towers/ are fine."
    assert problems_in(text) == [
        "fake.md:1: `training/nope/`: no such path in the repository",
        "fake.md:1: `configs/nope.yaml`: no such path in the repository",
    ]


def test_a_missing_make_target_is_reported() -> None:
    text = '```bash\nmake nope\ntime make demo   # make nothing\ncurl -F "text=make the square red"\n```'
    assert problems_in(text) == ["fake.md:2: `make nope`: no such target in the Makefile"]


def test_a_broken_link_or_anchor_is_reported() -> None:
    text = "# Top\n[a](nope.md), [b](design.md#nope), [c](design.md#registries), [d](#top), [e](#nowhere)"
    assert problems_in(text) == [
        "fake.md:2: link `nope.md`: no such file",
        "fake.md:2: link `design.md#nope`: no heading with that anchor",
        "fake.md:2: link `#nowhere`: no heading with that anchor",
    ]
