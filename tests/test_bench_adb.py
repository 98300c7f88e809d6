"""The bench's adb target, against a stand-in adb that runs the device's shell locally.

The on-device binaries are llama.cpp's real llama-bench and llama-completion, built from the
llama-cpp-python sdist (cached under $EDGEGEMMA_HOME; the first builds take minutes): for this
machine, and cross-built for arm64, which the stand-in runs under qemu-user, so llama.cpp's
ARM kernels and its Q4_0 repacking run for real (at emulated speed).
No real Android device is involved: see docs/devices.md for what that leaves unverified.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from loras import random_lora

from edgegemma.bench import cli, schema
from edgegemma.bench.adb import pick_device
from edgegemma.bench.targets import TargetError

HERE = Path(__file__).parent
STANDIN = HERE / "adb_standin" / "adb"
QEMU = "qemu-aarch64-static"
PROPS = {
    "ro.product.model": "Pixel 8",
    "ro.product.manufacturer": "Google",
    "ro.soc.manufacturer": "Google",
    "ro.soc.model": "Tensor G3",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.product.cpu.abi": "arm64-v8a",
}


@pytest.fixture(scope="module")
def llama_tools() -> dict[str, Path]:
    sys.path.insert(0, str(HERE / "adb_standin"))
    try:
        from build_llama_tools import llama_tools as build
    finally:
        sys.path.pop(0)
    return build()


@pytest.fixture(scope="module")
def arm64_tools() -> dict[str, Path]:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is needed to run arm64 binaries: apt-get install qemu-user-static")
    sys.path.insert(0, str(HERE / "adb_standin"))
    try:
        from build_llama_tools import arm64_tools as build
    finally:
        sys.path.pop(0)
    return build()


@pytest.fixture(scope="module")
def llama_bench(llama_tools) -> Path:
    return llama_tools["llama-bench"]


@pytest.fixture
def device(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "device"
    root.mkdir()
    (root / "props.json").write_text(json.dumps(PROPS))
    monkeypatch.setenv("ADB_STANDIN_ROOT", str(root))
    monkeypatch.delenv("ADB_STANDIN_DEVICES", raising=False)
    return root


def _adb_args(llama_bench: Path, gguf_path: Path, out: Path) -> list[str]:
    return [
        "--target", "adb", "--adb", str(STANDIN), "--llama-bench", str(llama_bench),
        "--model", str(gguf_path), "-p", "16", "-n", "4", "-r", "2", "-t", "2", "--json", str(out),
    ]  # fmt: skip


def test_adb_target_runs_llama_bench_on_the_device(
    device, llama_bench, gguf_path, tmp_path, capsys
):
    out = tmp_path / "phone.json"
    code = cli.main(_adb_args(llama_bench, gguf_path, out))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    found = json.loads(out.read_text())
    jsonschema.validate(found, schema.SCHEMA)
    assert found["target"] == "adb:standin-01"
    facts = found["device"]
    assert (facts["model"], facts["soc"], facts["android"], facts["abi"]) == (
        "Pixel 8",
        "Google Tensor G3",
        "14",
        "arm64-v8a",
    )
    assert facts["cores"] >= 1 and facts["ram_mb"] > 0
    assert facts["machine"] == platform.machine() and facts["emulated"] is None
    (run,) = found["runs"]
    assert run["runner"] == "llama-bench" and run["error"] is None and run["rss_source"] == "VmHWM"
    assert run["peak_rss_mb"] > run["model_size_mb"] > 0
    pp, tg = run["results"]
    assert (pp["workload"], tg["workload"]) == ("pp16", "tg4")
    assert pp["prefill_tps"]["n"] == 2 and pp["prefill_tps"]["min"] > 0
    assert tg["decode_tps"]["n"] == 2 and tg["decode_tps"]["min"] > 0
    assert pp["latency_s"]["p50"] <= pp["latency_s"]["p99"]
    # The model and the binary were pushed to the device's work directory.
    pushed = device / "data/local/tmp/edgegemma"
    assert (pushed / gguf_path.name).stat().st_size == gguf_path.stat().st_size
    assert (pushed / "llama-bench").exists()
    assert found["skipped"][0]["reason"] == "task workloads on Android need --llama-completion PATH"
    assert "Pixel 8" in captured.out
    # A second run finds the same model on the device and does not push it again.
    assert cli.main(_adb_args(llama_bench, gguf_path, out)) == 0
    assert "pushing gemma" not in capsys.readouterr().err


def test_device_that_disconnects_mid_run_keeps_partial_results(
    device, llama_bench, gguf_path, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ADB_STANDIN_DISCONNECT_ON", "-o json")
    monkeypatch.setenv("ADB_STANDIN_DISCONNECT_NTH", "2")  # the second workload, tg4
    out = tmp_path / "cut.json"
    code = cli.main(_adb_args(llama_bench, gguf_path, out))
    captured = capsys.readouterr()
    assert code == 1
    found = json.loads(out.read_text())
    jsonschema.validate(found, schema.SCHEMA)
    (run,) = found["runs"]
    assert [row["workload"] for row in run["results"]] == ["pp16"]
    assert run["results"][0]["prefill_tps"]["min"] > 0
    assert "device standin-01 disconnected during tg4" in run["error"]
    assert "disconnected during tg4" in captured.out  # in the table's notes
    assert "pp16" in captured.out


def test_task_workload_and_adapter_on_the_device(
    device, llama_tools, gguf_path, base_header, tmp_path, capsys
):
    adapter = random_lora(tmp_path / "a.gguf", base_header, seed=1, std=0.03)
    out = tmp_path / "tasks.json"
    code = cli.main([
        "--target", "adb", "--adb", str(STANDIN), "--llama-completion", str(llama_tools["llama-completion"]),
        "--model", str(gguf_path), "-p", "0", "-n", "0", "--task", "sensor", "--task-limit", "1",
        "--warmup", "0", "-t", "2", "--adapter", f"a={adapter}", "--json", str(out),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    found = json.loads(out.read_text())
    jsonschema.validate(found, schema.SCHEMA)
    (run,) = found["runs"]
    assert run["runner"] == "llama-completion" and run["error"] is None
    assert run["peak_rss_mb"] > run["model_size_mb"] and run["load_s"] > 0
    assert [(r["workload"], r["adapter"]) for r in run["results"]] == [
        ("sensor", None),
        ("sensor", "a"),
    ]
    for row in run["results"]:
        assert row["requests"] == 1 and row["accuracy"] in (0, 1)
        # The base model gets the few-shot prompt, the adapter the bare one it was trained on.
        assert row["prompt_tokens"] > (200 if row["adapter"] is None else 10)
        assert row["prefill_tps"]["min"] > 0
        assert row["ttft_s"]["p50"] <= row["latency_s"]["p50"]
    assert (device / "data/local/tmp/edgegemma/adapter-a.gguf").exists()
    assert any("adapter swap time is not measured" in s["reason"] for s in found["skipped"])


def test_device_selection_errors(device, monkeypatch):
    adb = str(STANDIN)
    assert pick_device(adb, None).serial == "standin-01"
    monkeypatch.setenv("ADB_STANDIN_DEVICES", "")
    with pytest.raises(TargetError, match="no Android device is attached"):
        pick_device(adb, None)
    monkeypatch.setenv("ADB_STANDIN_DEVICES", "a1:device,b2:unauthorized")
    with pytest.raises(TargetError, match="several devices .*adb:SERIAL"):
        pick_device(adb, None)
    with pytest.raises(TargetError, match="b2 is unauthorized: accept the USB debugging prompt"):
        pick_device(adb, "b2")
    with pytest.raises(TargetError, match="c3 is not attached"):
        pick_device(adb, "c3")
    assert pick_device(adb, "a1").serial == "a1"
    with pytest.raises(TargetError, match="adb not found"):
        pick_device(str(device / "no-adb-here"), None)


def test_adb_target_needs_the_tools(device, capsys):
    assert cli.main(["--target", "adb", "--adb", str(STANDIN)]) == 2
    assert "--llama-bench PATH" in capsys.readouterr().err
    assert cli.main(["--llama-completion", "/x/llama-completion"]) == 2
    assert "for the adb target" in capsys.readouterr().err


def test_local_llama_bench_reference(llama_bench, gguf_path, tmp_path):
    out = tmp_path / "local.json"
    code = cli.main([
        "--backend", "llamacpp", "--model", str(gguf_path), "--llama-bench", str(llama_bench),
        "-p", "16", "-n", "4", "-r", "2", "-t", "2", "--task", "none", "--no-baseline", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    found = json.loads(out.read_text())
    _, reference = found["runs"]
    assert reference["runner"] == "llama-bench" and reference["error"] is None
    assert reference["peak_rss_mb"] > reference["model_size_mb"]
    assert [row["workload"] for row in reference["results"]] == ["pp16", "tg4"]
    assert reference["results"][1]["decode_tps"]["mean"] > 0


def test_adb_target_runs_arm64_binaries_and_says_they_were_emulated(
    device, arm64_tools, gguf_path, tmp_path, capsys
):
    out = tmp_path / "arm64.json"
    args = _adb_args(arm64_tools["llama-bench"], gguf_path, out)
    args[args.index("-r") + 1] = "1"
    args[args.index("-p") + 1] = "0"  # one emulated process is enough
    code = cli.main([*args, "--warmup", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    found = json.loads(out.read_text())
    jsonschema.validate(found, schema.SCHEMA)
    facts = found["device"]
    assert facts["machine"] == platform.machine() != "aarch64"
    assert (
        facts["emulated"]
        == f"aarch64 binaries on a {platform.machine()} device, through an emulator"
    )
    (run,) = found["runs"]
    assert run["label"] == "llama-bench (device, emulated)" and run["error"] is None
    assert [row["workload"] for row in run["results"]] == ["tg4"]
    assert run["results"][0]["decode_tps"]["mean"] > 0
    # llama.cpp's ARM build says what it runs with; the report says the speed is not a phone's.
    assert "EMULATED" in captured.out and "timings are not this device's speed" in captured.out


def _greedy(binary: Path, model: Path, tokens: int, *, emulate: bool) -> str:
    args = [str(binary), "-m", str(model), "-p", "The capital of France is", "-n", str(tokens),
            "--temp", "0", "--seed", "0", "-t", "2", "-c", "256", "-no-cnv", "--no-display-prompt"]  # fmt: skip
    done = subprocess.run(
        [QEMU, "-cpu", "cortex-a76", *args] if emulate else args,
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_arm64_tool_generates_the_x86_tools_greedy_tokens(arm64_tools, llama_tools, gguf_path):
    """The pinned file on llama-completion built for each: the same first 12 tokens (they
    stay equal for 15 here; where and why the builds part: tests/test_arm64.py)."""
    arm = _greedy(arm64_tools["llama-completion"], gguf_path, 12, emulate=True)
    x86 = _greedy(llama_tools["llama-completion"], gguf_path, 12, emulate=False)
    assert arm.strip() and arm == x86
