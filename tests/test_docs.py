"""The documentation's code runs as written, so that it cannot drift from what edgegemma does.

Every fenced ``python`` and ``sh`` block of the README and of docs/generation.md, and of each
other guide's "Quick start" section, runs here: a document's python blocks in order in one
namespace (a reader's session), its sh blocks with bash, the venv's ``edgegemma`` and
``python`` first on ``PATH``, all in a fresh working directory. A print whose comment shows a
value (``# ' critical'``) must print that text; one that says ``# about ...`` is not checked
(probabilities round differently on other CPUs). An HTML comment right before a block changes
how it runs:

- ``<!-- fixture: NAME, ... (why) -->`` provides what the block needs: ``sensor.gguf`` (the
  shipped sensor skill's adapter file in the working directory) or ``server`` (the block is a
  server command: it starts in the background, the next blocks run against it once
  ``/health`` answers, and it stops at the end of the document);
- ``<!-- not run: REASON -->`` for the few blocks that install packages, train or need a
  device. Each says why, and they are counted: the README keeps them few.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgegemma import skills

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
RUN_WHOLE = {README, ROOT / "docs" / "generation.md"}
"""Pages every block of which runs (the others run their "Quick start" section)."""
RUN_LANGUAGES = {"python", "sh"}
"""Fences that hold code to run; an unlabelled or ``text`` fence is a picture (the module map)."""
MAX_README_LINES = 250
FIRST_EXAMPLE_BY_LINE = 40
MAX_README_NOT_RUN = 3
SETUP_COMMAND = "./setup.sh"
TEST_COMMAND = ".venv/bin/python -m pytest"
FIXTURES = {"sensor.gguf", "server"}
SERVER_START_TIMEOUT_S = 60.0

_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*(fixture|not run):\s*(.*?)\s*-->$")
_HEADING = re.compile(r"^(#+)\s+(.*)$")
_SHOWN_OUTPUT = re.compile(r"""^\s*print\(.*\)\s+#\s+(['"\[{0-9].*)$""")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    language: str
    code: str
    heading: str
    fixtures: tuple[str, ...] = ()
    not_run: str = ""

    def __str__(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks(document: Path) -> list[Block]:
    """The fenced blocks of a document, each with the directive and the heading before it."""
    found: list[Block] = []
    lines = document.read_text(encoding="utf-8").splitlines()
    heading, directive, index = "", ("", ""), 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence is None:
            if match := _HEADING.match(line):
                heading = match.group(2)
            if line.strip():
                named = _DIRECTIVE.match(line.strip())
                directive = (named.group(1), named.group(2)) if named else ("", "")
            index += 1
            continue
        end = index + 1
        while not lines[end].startswith("```"):
            end += 1
        kind, value = directive
        names = value.partition("(")[0].split(",") if kind == "fixture" else []
        found.append(
            Block(
                document=document,
                line=index + 1,
                language=fence.group(1),
                code="\n".join(lines[index + 1 : end]) + "\n",
                heading=heading,
                fixtures=tuple(name.strip() for name in names if name.strip()),
                not_run=value if kind == "not run" else "",
            )
        )
        directive, index = ("", ""), end + 1
    return found


def runnable(document: Path) -> list[Block]:
    """The code blocks of the README and the pages run whole; a guide's, in its "Quick start"."""
    return [
        block
        for block in blocks(document)
        if block.language in RUN_LANGUAGES
        and (document in RUN_WHOLE or block.heading.lower().startswith("quick start"))
    ]


DOCUMENTS = [README] + [guide for guide in GUIDES if runnable(guide)]


def test_the_readme_holds_only_code_that_runs_and_pictures():
    for block in blocks(README):
        assert block.language in RUN_LANGUAGES | {"text"}, f"{block}: a {block.language!r} block"


@pytest.mark.parametrize("document", [README, *GUIDES], ids=lambda path: path.name)
def test_directives_name_known_fixtures_or_a_reason(document: Path):
    for block in blocks(document):
        assert set(block.fixtures) <= FIXTURES, f"{block}: unknown fixture {block.fixtures}"
        assert block.not_run or "not run" not in block.code, block


def test_readme_is_a_guide_with_its_example_first():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES
    first = min(block.line for block in blocks(README) if block.language == "python")
    assert first <= FIRST_EXAMPLE_BY_LINE
    assert ".classify(" in blocks(README)[[b.line for b in blocks(README)].index(first)].code
    not_run = [block for block in runnable(README) if block.not_run]
    assert len(not_run) <= MAX_README_NOT_RUN, [str(block) for block in not_run]


def test_the_readme_carries_no_measurements():
    """Speeds, memory and accuracies live in docs/performance.md, dated, with their method."""
    figures = re.compile(r"tok/s|MiB|\d\s?ms\b|\d\s?%|\d(\.\d+)?x\b")
    found = [
        line for line in README.read_text(encoding="utf-8").splitlines() if figures.search(line)
    ]
    assert not found, found


def test_the_readme_two_commands_are_what_ci_runs():
    """The README's development commands are a contract: CI runs exactly them."""
    development = [block for block in blocks(README) if block.heading == "Development"]
    assert [block.code for block in development] == [f"{SETUP_COMMAND}\n{TEST_COMMAND}\n"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert SETUP_COMMAND in ci and TEST_COMMAND in ci


def _slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_every_relative_link_and_mentioned_doc_exists():
    """Links between documents reach a file (and heading), and so does a docs page code names."""
    markdown = [
        README,
        *sorted((ROOT / "docs").rglob("*.md")),
        ROOT / "benchmarks/results/README.md",
    ]
    for document in markdown:
        for target in _LINK.findall(document.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            assert linked.exists(), f"{document.relative_to(ROOT)} links {target}"
            if anchor and linked.suffix == ".md":
                headings = [
                    _slug(m.group(2))
                    for m in map(_HEADING.match, linked.read_text(encoding="utf-8").splitlines())
                    if m
                ]
                assert anchor in headings, f"{document.relative_to(ROOT)} links {target}"
    mentioned = re.compile(r"\bdocs/[\w/.-]+?\.md\b")
    for folder in ("src", "tests", "benchmarks", "examples", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".sh", ".toml"} or path == ROOT / ".ci" / "run":
                for name in mentioned.findall(path.read_text(encoding="utf-8", errors="replace")):
                    assert (ROOT / name).exists(), f"{path.relative_to(ROOT)} names {name}"


def _environment() -> dict[str, str]:
    """This interpreter's environment for a shell in another directory: its venv's commands
    first on PATH, and PYTHONPATH made absolute (a checkout run with PYTHONPATH=src); call it
    before changing directory."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(part).resolve()) for part in env["PYTHONPATH"].split(os.pathsep)
        )
    return env


def _check_shown_output(block: Block, printed: str) -> None:
    for line in block.code.splitlines():
        if shown := _SHOWN_OUTPUT.match(line):
            assert shown.group(1).strip() in printed, f"{block}: {line!r} printed {printed!r}"


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _start_server(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    given = re.search(r"--port (\d+)", block.code)
    assert given, f"{block}: a server block names its --port"
    port = int(given.group(1))
    if not _port_free(port):
        pytest.skip(f"{block}: port {port} is taken by another process")
    server = subprocess.Popen(["bash", "-c", f"exec {block.code.strip()}"], cwd=cwd, env=env)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"{block}: the server exited with {server.returncode}"
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1),
        ):
            return server
        time.sleep(0.2)
    server.kill()
    raise AssertionError(f"{block}: the server did not answer /health in time")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_documented_code_runs_as_written(document: Path, tmp_path: Path, monkeypatch):
    env = _environment()
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for block in runnable(document):
            if block.not_run:
                continue
            if "sensor.gguf" in block.fixtures:
                shutil.copyfile(skills.adapter_path("sensor"), tmp_path / "sensor.gguf")
            if "server" in block.fixtures:
                servers.append(_start_server(block, tmp_path, env))
            elif block.language == "python":
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    # Running the documentation's own code is what this test is for.
                    exec(compile(block.code, str(block), "exec"), namespace)  # noqa: S102
                _check_shown_output(block, printed.getvalue())
            else:
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block.code],
                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
                )  # fmt: skip
                assert done.returncode == 0, f"{block}:\n{done.stdout}\n{done.stderr}"
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
        engine = namespace.get("engine")
        if engine is not None and hasattr(engine, "close"):
            engine.close()
