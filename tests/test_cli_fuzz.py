"""Every command answers bad input with an exit status of 0, 1 or 2 and a one-line error:
never a traceback. Each case runs the real command in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgegemma.adapters.option import AdapterGrammar, AdapterOption
from edgegemma.errors import InvalidParameterError

FIFO_NAME = "fifo"


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "folder").mkdir()
    (folder / "text.txt").write_text("not json\n")
    (folder / "empty.json").write_text("{}")
    (folder / "package").mkdir()
    (folder / "package" / "manifest.json").write_text('{"format": "edgegemma-adapter-package/1"}')
    (folder / "bad-runs.json").write_text(
        '{"schema": "edgegemma.bench/1", "created": "x", "target": "local", "host": {}, '
        '"settings": {}, "runs": [{"backend": 5}], "overhead": [], "skipped": [], "errors": []}'
    )
    os.mkfifo(folder / FIFO_NAME)
    return folder


CASES = [
    ["edgegemma", "generate"],
    ["edgegemma", "generate", "x", "--max-tokens", "-3"],
    ["edgegemma", "generate", "x", "--max-tokens", "lots"],
    ["edgegemma", "generate", "x", "--temperature", "nan"],
    ["edgegemma", "generate", "x", "--temperature", "1e39"],
    ["edgegemma", "generate", "x", "--seed", "4294967295"],
    ["edgegemma", "generate", "x", "--threads", "100000"],
    ["edgegemma", "generate", "x", "--n-ctx", "0"],
    ["edgegemma", "generate", "x", "--model", "no-such-model"],
    ["edgegemma", "generate", "x", "--model", "./folder"],
    ["edgegemma", "generate", "x", "--backend", "nonesuch"],
    ["edgegemma", "generate", "x", "--adapter", "broken"],
    ["edgegemma", "generate", "x", "--adapter", "a=text.txt"],
    ["edgegemma", "generate", "x", "--adapter", "a=folder:0.5"],
    ["edgegemma", "generate", "x", "--adapter", "llamacpp:a=text.txt"],
    ["edgegemma", "serve", "--adapter", "a=text.txt:0.5"],
    ["edgegemma", "serve", "--adapter", "sensor"],
    ["edgegemma", "generate", "x", "--on-overflow", "sideways"],
    ["edgegemma", "gateway"],
    ["edgegemma", "gateway", "--broker", "h:port", "--in", "a/#", "--skill", "sensor"],
    ["edgegemma", "gateway", "--broker", "h:1883", "--in", "a/#", "--skill", "emoji"],
    ["edgegemma", "gateway", "--broker", "h:1883", "--in", "a/#"],
    ["edgegemma", "gateway", "--broker", "h:1883", "--in", "a/#", "--skill", "x", "--batch", "0"],
    ["edgegemma", "gateway", "--broker", "h:1883", "--config", "text.txt"],
    ["edgegemma", "gateway", "--broker", "h:1883", "--config", "folder"],
    [
        "edgegemma",
        "gateway",
        "--broker",
        "h:1883",
        "--in",
        "a/#",
        "--skill",
        "sensor",
        "--out",
        "#",
    ],
    ["edgegemma", "perplexity", "folder"],
    ["edgegemma", "perplexity", "text.txt", "--window", "3"],
    ["edgegemma", "perplexity", "text.txt", "--backend", "mediapipe", "--model", "text.txt"],
    ["edgegemma", "models", "fetch", "no-such-model"],
    ["edgegemma", "models", "verify", "no-such-model"],
    ["edgegemma", "models", "frobnicate"],
    ["edgegemma", "convert", "text.txt", "--to", "onnx"],
    ["edgegemma", "convert", "gemma3-270m", "--to", "gguf", "--quant", "q9"],
    ["edgegemma", "convert", "gemma3-270m", "--to", "nowhere"],
    ["edgegemma", "adapters", "inspect", "text.txt"],
    ["edgegemma", "adapters", "inspect", "folder"],
    ["edgegemma", "adapters", "inspect", FIFO_NAME],
    ["edgegemma", "adapters", "convert", "folder", "--to", "gguf"],
    ["edgegemma", "adapters", "convert", "folder", "--to", "elsewhere"],
    ["edgegemma", "adapters", "validate", "text.txt"],
    ["edgegemma", "adapters", "inspect", "package"],
    ["edgegemma", "adapters", "pack", "text.txt", "--name", "a", "--version", "1", "-o", "out"],
    ["edgegemma", "adapters", "pack", "text.txt", "--name", "../a", "--version", "1", "-o", "o"],
    ["edgegemma", "adapters", "keygen", "text.txt"],
    ["edgegemma", "adapters", "repo-init", "out", "--key", "text.txt"],
    [
        "edgegemma",
        "adapters",
        "publish",
        "text.txt",
        "--name",
        "a",
        "--version",
        "1",
        "--repo",
        "folder",
        "--key",
        "text.txt",
    ],
    [
        "edgegemma",
        "adapters",
        "pull",
        "a",
        "--repo",
        "http://127.0.0.1:9",
        "--root",
        "text.txt",
        "--store",
        "out",
    ],
    [
        "edgegemma",
        "adapters",
        "pull",
        "a",
        "--repo",
        "http://127.0.0.1:9",
        "--root",
        "empty.json",
        "--store",
        "out",
    ],
    ["edgegemma", "adapters", "pull", "../a", "--repo", "x", "--root", "text.txt"],
    ["edgegemma", "adapters", "rollback", "a", "--store", "folder"],
    ["edgegemma", "train", "--data", "folder", "--out", "out"],
    ["edgegemma", "train", "--data", "text.txt", "--out", "out"],
    ["edgegemma.bench", "--json", "/proc/no/such/dir/out.json", "-p", "8"],
    ["edgegemma.bench", "--json", "folder", "-p", "8"],
    ["edgegemma.bench", "-p", "0", "-n", "-1"],
    ["edgegemma.bench", "--target", "carrier-pigeon"],
    ["edgegemma.bench", "compare", "folder"],
    ["edgegemma.bench", "compare", "text.txt"],
    ["edgegemma.bench", "compare", "empty.json"],
    ["edgegemma.bench", "compare", "bad-runs.json"],
    ["edgegemma.bench", "compare", FIFO_NAME],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c[1:]) or c[0] for c in CASES])
def test_bad_input_is_a_clean_error(place, args):
    found = run(args, place)
    assert found.returncode in (1, 2), (found.returncode, found.stderr[-800:])
    assert "Traceback" not in found.stderr, found.stderr[-2000:]
    lines = [line for line in found.stderr.strip().splitlines() if line.strip()]
    assert lines, "an error must say something"
    if found.returncode == 1:
        assert "error" in lines[-1], lines[-1]


def test_a_fifo_in_place_of_a_cache_record_does_not_hang(tmp_path):
    """A pin record that is not a regular file is refused, not read forever."""
    home = tmp_path / "home"
    record = home / "models" / "gemma3-270m"
    record.mkdir(parents=True)
    os.mkfifo(record / "pin.json")
    found = run(
        ["edgegemma", "models", "fetch", "gemma3-270m"], tmp_path, {"EDGEGEMMA_HOME": str(home)}
    )
    assert found.returncode == 1 and "not a regular file" in found.stderr
    assert "Traceback" not in found.stderr


def test_mediapipe_with_an_unusable_home_is_a_model_error(tmp_path, gguf_path):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    found = run(
        ["edgegemma", "generate", "x", "--backend", "mediapipe", "--max-tokens", "1"],
        tmp_path,
        {"EDGEGEMMA_HOME": str(home)},
    )
    assert found.returncode == 1 and "Traceback" not in found.stderr
    assert str(home) in found.stderr


def test_one_adapter_grammar_each_command_taking_its_parts():
    everything = AdapterGrammar(backends=("llamacpp", "onnx"), skills=("sensor",))
    assert everything.parse("a=/x/a.gguf") == AdapterOption("a", "/x/a.gguf")
    assert everything.parse("a=/x/a.gguf:0.5") == AdapterOption("a", "/x/a.gguf", 0.5)
    assert everything.parse("a=C:/x/a:b.gguf") == AdapterOption("a", "C:/x/a:b.gguf")
    assert everything.parse("onnx:a=a.onnx_adapter:2") == AdapterOption(
        "a", "a.onnx_adapter", 2.0, "onnx"
    )
    assert everything.parse("sensor") == AdapterOption("sensor", "")
    assert everything.parse("llamacpp:sensor") == AdapterOption("sensor", "", backend="llamacpp")
    assert everything.metavar == "[BACKEND:]NAME=PATH[:SCALE]|[BACKEND:]SKILL"
    generate, serve = AdapterGrammar(), AdapterGrammar(scale=False)
    assert (generate.metavar, serve.metavar) == ("NAME=PATH[:SCALE]", "NAME=PATH")
    refused = [
        (everything, "emoji"), (everything, "mediapipe:a=x"), (everything, "a="), (everything, "=x"),
        (generate, "sensor"), (generate, "onnx:a=x"), (serve, "a=x:0.5"), (serve, "a:b=x"),
    ]  # fmt: skip
    for grammar, text in refused:
        with pytest.raises(InvalidParameterError, match=f"--adapter takes .*got {text!r}"):
            grammar.parse(text)
