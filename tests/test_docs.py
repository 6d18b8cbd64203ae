"""The commands and links of README.md and docs/*.md against the code, so the docs cannot drift.

Every shell code block (```bash, ```sh, ```shell, ```console or a bare ```) is split into
commands (line continuations joined, quotes spanning lines kept, ``;`` / ``&&`` / ``|`` split,
``VAR=value`` prefixes dropped); inline code spans of the text and tables that run python, a
``.py`` script with arguments, make or bash are commands too (the demo's AP table shows its
runs so). Then:

- ``python train_net.py ...``, ``python -m retinanet_plugin.<module> ...`` and ``python
  <script>.py ...`` (also as ``.venv/bin/python`` / ``python3``): the script or module exists,
  and its arguments go through the parser the code builds. The module's (or script's) ``if
  __name__ == "__main__":`` block is run with those arguments and stopped as soon as an argparse
  parser has parsed them, so whatever parser the code builds today (for train_net.py
  ``retinanet_plugin.engine.argument_parser``, detectron2's ``default_argument_parser`` that also
  takes flags after the overrides; a tool's ``parse_args``; a parser made inside ``main``) is
  the one checked. A ``--config-file`` must exist in the repository, and its KEY
  VALUE overrides (``opts``) must merge into it (``retinanet_plugin.config.load_config``: keys
  that exist, values of their type). All of this runs in one child process
  (:func:`parse_in_worker`), so the programs' imports and logging set-up stay out of the suite.
- ``make <target>``: the target exists in the Makefile.
- ``bash <script>``: the script exists.
- Any other program must be in the small :data:`OTHER_PROGRAMS` allow-list (``python -c`` is
  inline code, not checked).

Files a command reads or writes (weights, datasets, outputs) need not exist. Placeholders the text
defines, or files the text has the user create, are the explicit allow-lists below; each entry
must still be used somewhere, so the lists cannot rot. Every relative link or image in README.md
and docs/*.md must resolve to a file, and a ``#fragment`` to a heading of that page (GitHub's
anchors); README.md must link every page of docs/.
"""

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
PYTHONS = {".venv/bin/python", "python", "python3"}

# Text in a command that stands for something the reader fills in, and what is checked instead.
PLACEHOLDER_TEXT = {
    # demo.md: the 600-step command its table abbreviates (its overrides are checked with it)
    "<LONG>": ".venv/bin/python train_net.py --config-file "
              "configs/demo_deepforest_mobilenet_v2_fpn.yaml",
    # test_time.md: one row of the table under the command
    "<OPTIONS>": "",
    # training.md: the address of the first machine
    "<host of rank 0>": "HOST",
    # anchors.md: the tool's synopsis, optional arguments in brackets
    "[--dataset NAME_OR_COCO_JSON ...] [--output DIR] [KEY VALUE ...]": (
        "--dataset NAME --output DIR"
    ),
}
# --config-file values that are not files of the repository, and the config checked instead.
PLACEHOLDER_CONFIGS = {
    # anchors.md: the tool's synopsis
    "CONFIG": "configs/Base-FocalRetinaNet.yaml",
    # README.md: the user's copy of the example, made by the `cp` the text shows
    "configs/my_coco.yaml": "configs/custom_coco_example.yaml",
    # README.md: the same for the Python config
    "configs/my_coco.py": "configs/custom_coco_example.py",
    # reliability.md: the crafted config (its _BASE_ the demo config) that the loader refuses
    "evil.yaml": "configs/demo_deepforest_mobilenet_v2_fpn.yaml",
}
# Programs shown in code blocks that this test does not check.
OTHER_PROGRAMS = {"cp"}
# `python -m` modules outside retinanet_plugin that the docs show (install.md: the venv;
# tests.md: the suite against another detectron2).
OTHER_MODULES = {"venv", "pytest"}

_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEPARATORS = {";", "&&", "||", "|", "&"}


class Command(NamedTuple):
    where: str  # file:line of the command's first line
    text: str  # the command as written, continuations joined


# -- reading the docs ------------------------------------------------------------------------


def _code_blocks(path: Path) -> List[Tuple[int, str, List[str]]]:
    """(line of the first code line, language, lines with the fence's indent removed)."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language, body = len(m.group(1)), m.group(2).lower(), []
        start = i + 2
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        assert i < len(lines), f"{path.name}:{start - 1}: code block never closed"
        blocks.append((start, language, body))
        i += 1
    return blocks


def _block_commands(body: Sequence[str], first: int = 1) -> List[Tuple[int, str]]:
    """(line, command) of a shell block: continuations joined, a quote may span lines."""
    commands: List[Tuple[int, str]] = []
    pending, pending_line = "", None
    for number, line in enumerate(body, first):
        if pending_line is None:
            pending_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote spans lines (python -c "...")
            pending += "\n"
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append((pending_line, pending))
        pending, pending_line = "", None
    assert not pending.strip(), f"line {pending_line}: unterminated command"
    return commands


def _shell_commands(path: Path) -> List[Command]:
    return [
        Command(f"{path.relative_to(REPO)}:{line}", text)
        for first, language, body in _code_blocks(path) if language in SHELL_LANGUAGES
        for line, text in _block_commands(body, first)
    ]


_INLINE_CODE = re.compile(r"`([^`]+)`")


def _outside_code_blocks(path: Path) -> str:
    """The page with the lines of its code blocks blanked (line numbers kept)."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        fence = bool(re.match(r"^\s*```", line))
        lines.append("" if inside or fence else line)
        inside ^= fence
    return "\n".join(lines)


def _inline_commands(path: Path) -> List[Command]:
    """Inline code spans of the prose and tables that are commands of a program this test
    checks (python, a .py script, make, bash), as the demo's and the test-time tables show."""
    text, commands = _outside_code_blocks(path), []
    for m in _INLINE_CODE.finditer(text):
        span = " ".join(m.group(1).split())
        try:
            words = _simple_commands(_fill_placeholders(span))
        except ValueError:  # an unbalanced quote: code, not a command
            continue
        program = words[0][0] if words else ""
        # a bare "x.py" names a file; "x.py --flag ..." is a command
        if program in PYTHONS or program in ("make", "bash") or (
                program.endswith(".py") and len(words[0]) > 1):
            line = text.count("\n", 0, m.start()) + 1
            commands.append(Command(f"{path.relative_to(REPO)}:{line}", span))
    return commands


def _fill_placeholders(text: str, used: Optional[Set[str]] = None) -> str:
    for placeholder, replacement in PLACEHOLDER_TEXT.items():
        if placeholder in text:
            text = text.replace(placeholder, replacement)
            if used is not None:
                used.add(placeholder)
    return text


def _simple_commands(text: str) -> List[List[str]]:
    """The words of each simple command (split at ; && || | &), VAR=value prefixes dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for token in lexer:
        if token in _SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    result = []
    for words in commands:
        while words and _ENV_PREFIX.match(words[0]):
            words = words[1:]
        if words:
            result.append(words)
    return result


ALL_COMMANDS = [c for path in DOC_FILES for c in _shell_commands(path) + _inline_commands(path)]


# -- running a parser ------------------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing():
    """ArgumentParser.parse_args / parse_known_args parse as usual, then raise :class:`_Parsed`
    instead of returning, so the program stops before it does any work."""
    parse_args = argparse.ArgumentParser.parse_args
    parse_known_args = argparse.ArgumentParser.parse_known_args
    inside = []

    def stopping_parse_args(self, args=None, namespace=None):
        inside.append(True)
        try:
            parsed = parse_args(self, args, namespace)
        finally:
            inside.pop()
        raise _Parsed(parsed)

    def stopping_parse_known_args(self, args=None, namespace=None):
        parsed = parse_known_args(self, args, namespace)
        if not inside:  # called by the program itself, not by parse_args
            raise _Parsed(parsed[0])
        return parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stopping_parse_args), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args",
                              stopping_parse_known_args):
        yield


_LOADED: Dict[str, Tuple[Optional[ModuleType], object]] = {}


def _main_block(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__"
                        for c in node.test.comparators)):
            return compile(ast.Module(body=node.body, type_ignores=[]), str(path), "exec")
    return None


def _load(kind: str, target: str) -> Tuple[Optional[ModuleType], object]:
    """(module, code of its __main__ block), imported once. ``kind``: "module" or "script"."""
    key = f"{kind}:{target}"
    if key in _LOADED:
        return _LOADED[key]
    if kind == "module":
        spec = importlib.util.find_spec(target)
        assert spec is not None, f"no module {target}"
        if spec.submodule_search_locations is not None:  # a package: runpy runs its __main__
            _LOADED[key] = (None, None)
            return _LOADED[key]
        module = importlib.import_module(target)
        path = Path(module.__file__)
    else:
        path = REPO / target
        name = "_docs_script_" + re.sub(r"\W", "_", target)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with mock.patch.object(sys, "path", [str(path.parent), str(REPO), *sys.path]):
            spec.loader.exec_module(module)
    code = _main_block(path)
    assert code is not None, f"{path.relative_to(REPO)} has no `if __name__ == \"__main__\":`"
    _LOADED[key] = (module, code)
    return _LOADED[key]


def _parse(kind: str, target: str, argv: Sequence[str]) -> argparse.Namespace:
    """The namespace the program's own parser makes of ``argv``; AssertionError with argparse's
    message when it refuses them."""
    module, code = _load(kind, target)
    stderr = io.StringIO()
    argv0 = target if kind == "script" else target.rsplit(".", 1)[-1]
    with _stop_after_parsing(), mock.patch.object(sys, "argv", [argv0, *argv]), \
            contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            if module is None:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                with mock.patch.object(sys, "path", [str(REPO), *sys.path]):
                    exec(code, module.__dict__)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            if e.code in (0, None):  # --help
                return argparse.Namespace()
            error = (stderr.getvalue().strip().splitlines() or [""])[-1]  # argparse's last line
            raise AssertionError(
                f"{target} refuses {' '.join(argv)!r} (exit {e.code}): {error}") from None
    raise AssertionError(f"{target} returned without parsing its arguments")


def _check_config(namespace: argparse.Namespace) -> None:
    config = getattr(namespace, "config_file", None)
    if not config:  # detectron2's parser defaults to ""
        return
    config = PLACEHOLDER_CONFIGS.get(config, config)
    path = Path(config) if Path(config).is_absolute() else REPO / config
    assert path.is_file(), f"--config-file {config}: no such file in the repository"
    opts = getattr(namespace, "opts", None) or []
    if opts and opts[0] == "--":  # argparse.REMAINDER keeps a leading "--"
        opts = opts[1:]
    from retinanet_plugin.config import load_config
    from retinanet_plugin.lazy.loading import is_lazy_config, load_lazy_config

    try:
        if is_lazy_config(str(path)):  # a Python config: its key=value overrides must apply
            load_lazy_config(str(path), opts)
        else:
            load_config(str(path), opts)
    except Exception as e:  # any failure is a doc error, reported with its cause
        raise AssertionError(f"{config} with {opts}: {type(e).__name__}: {e}") from None


Job = Tuple[str, str, Tuple[str, ...]]  # ("module" or "script", its name or path, arguments)


def _parse_and_check(job: Job) -> Dict[str, Optional[str]]:
    """In the worker: {"config_file": the value parsed} or {"error": why the command fails}."""
    result: Dict[str, Optional[str]] = {}
    try:
        namespace = _parse(*job)
        result["config_file"] = getattr(namespace, "config_file", None) or None
        _check_config(namespace)
    except AssertionError as e:
        result["error"] = str(e)
    except Exception as e:  # an import error of the module, for one
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def parse_in_worker(jobs: Sequence[Job]) -> Dict[Job, Dict[str, Optional[str]]]:
    """Runs the jobs in one child process (this file with --worker), so that the imported
    programs, the logging they set up and the patched parsers stay out of the test session."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file, results_file = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_file.write_text(json.dumps([list(job[:2]) + [list(job[2])] for job in jobs]))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        run = subprocess.run(
            [sys.executable, __file__, "--worker", str(jobs_file), str(results_file)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0 and results_file.exists(), (
            f"the parsing worker failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
        results = json.loads(results_file.read_text())
    return dict(zip(jobs, results))


def _makefile_targets() -> Set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s#:=][^:=]*?)\s*::?(?!=)", line)
        if m:
            targets.update(t for t in m.group(1).split() if not t.startswith((".", "$")))
    return targets


def command_jobs(text: str, used: Optional[Set[str]] = None) -> List[Job]:
    """The programs ``text`` runs whose arguments need their parser (see :func:`check_command`);
    AssertionError for what is wrong without it (a missing file, module or make target)."""
    jobs: List[Job] = []
    for words in _simple_commands(_fill_placeholders(text, used)):
        program, args = words[0], words[1:]
        if program in PYTHONS:
            if args[:1] == ["-c"]:
                continue  # inline code
            assert args, f"{program} without a script or module"
            if args[0] == "-m":
                assert len(args) > 1, f"{program} -m without a module"
                if args[1] in OTHER_MODULES:
                    continue
                assert args[1].startswith("retinanet_plugin."), (
                    f"python -m {args[1]}: not a retinanet_plugin module; check it or add it to "
                    f"OTHER_MODULES")
                assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
                jobs.append(("module", args[1], tuple(args[2:])))
            else:
                assert (REPO / args[0]).is_file(), f"{args[0]}: no such file"
                jobs.append(("script", args[0], tuple(args[1:])))
        elif program.endswith(".py"):
            script = program[2:] if program.startswith("./") else program
            assert (REPO / script).is_file(), f"{program}: no such file"
            jobs.append(("script", script, tuple(args)))
        elif program == "make":
            targets = [a for a in args if not a.startswith("-") and "=" not in a]
            missing = sorted(set(targets) - _makefile_targets())
            assert not missing, f"make: no target {missing} in the Makefile"
        elif program in ("bash", "sh"):
            script = next((a for a in args if not a.startswith("-")), None)
            assert script is None or (REPO / script).is_file(), f"{program} {script}: no such file"
        else:
            assert program in OTHER_PROGRAMS, (
                f"{program}: not a command this test knows; check it or add it to OTHER_PROGRAMS")
    return jobs


def check_command(text: str, parsed: Dict[Job, Dict[str, Optional[str]]],
                  used: Optional[Set[str]] = None) -> None:
    """Raises AssertionError when a command of ``text`` does not fit the code; ``parsed``: what
    :func:`parse_in_worker` made of its jobs."""
    for job in command_jobs(text, used):
        result = parsed[job]
        if used is not None and result.get("config_file") in PLACEHOLDER_CONFIGS:
            used.add(result["config_file"])
        assert not result.get("error"), result.get("error")


# -- links -----------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(path: Path) -> str:
    """The text outside code blocks and inline code spans."""
    return _INLINE_CODE.sub("", _outside_code_blocks(path))


def _anchors(path: Path) -> Set[str]:
    """GitHub's anchors of a markdown page's headings."""
    anchors: Set[str] = set()
    inside = False
    for line in path.read_text().splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
            continue
        m = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
            slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def broken_links(path: Path) -> List[str]:
    problems = []
    for target in _LINK.findall(_prose(path)):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # https:, mailto:
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {resolved.name}")
    return problems


# -- tests -----------------------------------------------------------------------------------

# Commands the checks must refuse, and the words of the reason (test_check_command_catches).
CAUGHT = [
    (".venv/bin/python train_net.py --config-file configs/retinanet_R_50_FPN_1x.yaml --no-such",
     "unrecognized arguments: --no-such"),
    (".venv/bin/python train_net.py --config-file configs/no_such.yaml", "no such file"),
    ("OMP_NUM_THREADS=1 .venv/bin/python train_net.py \\\n"
     "    --config-file configs/retinanet_R_50_FPN_1x.yaml SOLVER.NO_SUCH_KEY 1", "NO_SUCH_KEY"),
    (".venv/bin/python -m retinanet_plugin.tools.predict --config-file "
     "configs/retinanet_R_50_FPN_1x.yaml --weights w.pth --input x --output o --frobnicate",
     "--frobnicate"),
    (".venv/bin/python -m retinanet_plugin.tools.no_such_tool --help", "no module"),
    (".venv/bin/python benchmarks/no_such_benchmark.py", "no such file"),
    ("make no-such-target", "no target"),
    ("rm -rf output", "not a command this test knows"),
]


@pytest.fixture(scope="module")
def parsed() -> Dict[Job, Dict[str, Optional[str]]]:
    jobs: Set[Job] = set()
    caught = [command for text, _ in CAUGHT for _, command in _block_commands(text.splitlines())]
    for text in [c.text for c in ALL_COMMANDS] + caught:
        try:
            jobs.update(command_jobs(text))
        except AssertionError:
            pass  # reported by the test of that command
    return parse_in_worker(sorted(jobs))


def test_docs_hold_commands():
    assert len(ALL_COMMANDS) > 30, [c.where for c in ALL_COMMANDS]
    readme = [c for c in ALL_COMMANDS if c.where.startswith("README.md")]
    assert any(c.text.strip().startswith("make test") for c in readme)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_command_parses(command, parsed):
    problem = None
    try:
        check_command(command.text, parsed)
    except AssertionError as e:
        problem = str(e)
    if problem:
        pytest.fail(f"{command.where}: {problem}\n  {command.text.strip()}", pytrace=False)


def test_every_allow_list_entry_is_used(parsed):
    used: Set[str] = set()
    for command in ALL_COMMANDS:
        try:
            check_command(command.text, parsed, used)
        except AssertionError:
            pass  # reported by test_command_parses
    unused = (set(PLACEHOLDER_TEXT) | set(PLACEHOLDER_CONFIGS)) - used
    assert not unused, f"allow-list entries no doc uses any more: {sorted(unused)}"
    words = [w for c in ALL_COMMANDS for w in _simple_commands(_fill_placeholders(c.text))]
    programs = {w[0] for w in words}
    modules = {w[2] for w in words if w[0] in PYTHONS and w[1:2] == ["-m"] and len(w) > 2}
    assert OTHER_PROGRAMS <= programs, f"unused OTHER_PROGRAMS: {OTHER_PROGRAMS - programs}"
    assert OTHER_MODULES <= modules, f"unused OTHER_MODULES: {OTHER_MODULES - modules}"


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(REPO)) for p in DOC_FILES])
def test_links_resolve(path):
    assert broken_links(path) == []


def test_readme_maps_every_doc():
    linked = {Path(t.partition("#")[0]).name for t in _LINK.findall(_prose(REPO / "README.md"))
              if t.startswith("docs/")}
    missing = sorted(p.name for p in DOC_FILES[1:] if p.name not in linked)
    assert not missing, f"docs/ pages README.md does not link: {missing}"


# The checks themselves fail on what they should catch.


@pytest.mark.parametrize("text, message", CAUGHT, ids=[str(i) for i in range(len(CAUGHT))])
def test_check_command_catches(text, message, parsed):
    [(_, command)] = _block_commands(text.splitlines())
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_command(command, parsed)


def test_broken_links_are_found(tmp_path):
    (tmp_path / "page.md").write_text(
        "# Title\n\n[ok](page.md#title) ![img](missing.png) [gone](other.md)\n"
        "[bad anchor](page.md#nothing) `[code](not-a-link.md)`\n"
        "```bash\n[also code](not-a-link.md)\n```\n"
    )
    assert broken_links(tmp_path / "page.md") == [
        "missing.png: no such file",
        "other.md: no such file",
        "page.md#nothing: no heading #nothing in page.md",
    ]


def test_commands_are_split_as_the_shell_does():
    block = ["# a comment line",
             "DETECTRON2_DATASETS=datasets OMP_NUM_THREADS=1 .venv/bin/python train_net.py \\",
             "    --config-file a.yaml DATASETS.TEST '(\"x\",)'   # a comment",
             '.venv/bin/python -c "import os',
             "print(os.sep)\"  # one command over two lines"]
    commands = _block_commands(block, 10)
    assert [line for line, _ in commands] == [11, 13]
    assert _simple_commands(commands[0][1]) == [
        [".venv/bin/python", "train_net.py", "--config-file", "a.yaml", "DATASETS.TEST",
         '("x",)']
    ]
    assert _simple_commands("make a && make b; cp x y") == [
        ["make", "a"], ["make", "b"], ["cp", "x", "y"]]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _jobs = [(kind, target, tuple(argv)) for kind, target, argv in
             json.loads(Path(sys.argv[2]).read_text())]
    Path(sys.argv[3]).write_text(json.dumps([_parse_and_check(job) for job in _jobs]))
