"""The ``adb[:SERIAL]`` target: llama.cpp's llama-bench on an Android device.

Python does not run on the phone, so the harness drives it from this machine with the
``adb`` binary: it picks the device, records its model, SoC and Android version
(``getprop``), pushes the model, the adapters and llama.cpp's tools built for Android into
``/data/local/tmp/edgegemma/`` (model and adapters only when the copy there differs), and runs
one llama-bench process per synthetic workload and one llama-completion process per task
request (with and without each adapter). A small shell loop on the device reads the
process's ``VmHWM`` from ``/proc/<pid>/status`` every 0.1 s while it runs: VmHWM is itself a
high-water mark, so the last reading is the peak up to at most 0.1 s before exit.

If the device goes away half way, the workloads already measured stay in the report and the
error says which one was cut.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import available_backends
from ..errors import EdgeGemmaError, InvalidParameterError
from ..files import sha256_file
from . import llamabench
from .stats import summarize
from .targets import BenchRequest, TargetError, models_for, new_report, say
from .workloads import Synthetic, Task, is_correct, load_task

DEVICE_DIR = "/data/local/tmp/edgegemma"
_PROPS = {
    "model": "ro.product.model",
    "manufacturer": "ro.product.manufacturer",
    "soc_manufacturer": "ro.soc.manufacturer",
    "soc_model": "ro.soc.model",
    "board": "ro.board.platform",
    "hardware": "ro.hardware",
    "android": "ro.build.version.release",
    "sdk": "ro.build.version.sdk",
    "abi": "ro.product.cpu.abi",
}
_HWM_MARK = "edgegemma-vmhwm-kb="
_EXIT_MARK = "edgegemma-exit="


class DeviceDisconnected(TargetError):
    """The device stopped answering while the bench ran."""


@dataclass(frozen=True)
class Adb:
    executable: str
    serial: str

    def run(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return _adb([self.executable, "-s", self.serial, *args], timeout=timeout)

    def connected(self) -> bool:
        done = self.run("get-state", timeout=30)
        return done.returncode == 0 and done.stdout.strip() == "device"

    def shell(self, command: str, *, what: str, timeout: float | None = None) -> str:
        """Run ``command`` in the device's shell; its stdout, or an error saying what failed."""
        done = self.run("shell", command, timeout=timeout)
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip())[
                -300:
            ] or f"exit code {done.returncode}"
            if not self.connected():
                raise DeviceDisconnected(
                    f"device {self.serial} disconnected during {what}: {detail}"
                )
            raise TargetError(f"{what} failed on device {self.serial}: {detail}")
        return done.stdout

    def push(self, local: Path, remote: str, *, what: str) -> None:
        done = self.run("push", str(local), remote)
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip())[-300:]
            if not self.connected():
                raise DeviceDisconnected(
                    f"device {self.serial} disconnected while pushing {what}: {detail}"
                )
            raise TargetError(f"pushing {what} to device {self.serial} failed: {detail}")


def _adb(args: list[str], *, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise TargetError(
            f"adb not found ({args[0]}): install Android platform-tools or pass --adb PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise TargetError(f"{shlex.join(args[:4])} did not answer in {timeout} s") from None


def pick_device(executable: str, serial: str | None) -> Adb:
    """The device to use: ``serial``, or the only one attached. Clear errors otherwise."""
    done = _adb([executable, "devices"], timeout=60)
    if done.returncode != 0:
        raise TargetError(f"'adb devices' failed: {done.stderr.strip() or done.stdout.strip()}")
    states = {}
    for line in done.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2:
            states[fields[0]] = fields[1]
    if serial is None:
        if not states:
            raise TargetError(
                "no Android device is attached ('adb devices' lists none); connect one with USB debugging on"
            )
        if len(states) > 1:
            raise TargetError(
                f"several devices are attached ({', '.join(states)}); pick one with --target adb:SERIAL"
            )
        serial = next(iter(states))
    state = states.get(serial)
    if state is None:
        raise TargetError(
            f"device {serial} is not attached (attached: {', '.join(states) or 'none'})"
        )
    if state != "device":
        hint = (
            "accept the USB debugging prompt on the device"
            if state == "unauthorized"
            else "reconnect it"
        )
        raise TargetError(f"device {serial} is {state}: {hint}")
    return Adb(executable, serial)


def device_facts(adb: Adb) -> dict[str, Any]:
    """Model, SoC, Android version, ABI, cores and RAM of the device."""
    script = "; ".join(f'echo "{key}=$(getprop {prop})"' for key, prop in _PROPS.items())
    script += '; echo "cores=$(nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo)"'
    script += '; echo "machine=$(uname -m)"'
    script += "; echo \"ram_kb=$(sed -n 's/^MemTotal:[^0-9]*\\([0-9]*\\).*/\\1/p' /proc/meminfo)\""
    facts: dict[str, Any] = {"serial": adb.serial}
    for line in adb.shell(script, what="reading device properties", timeout=60).splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            facts[key] = value.strip()
    soc = " ".join(v for v in (facts.get("soc_manufacturer"), facts.get("soc_model")) if v)
    facts["soc"] = soc or facts.get("board") or facts.get("hardware") or "unknown"
    facts["cores"] = int(facts["cores"]) if str(facts.get("cores", "")).isdigit() else None
    ram_kb = facts.pop("ram_kb", "")
    facts["ram_mb"] = int(ram_kb) / 1024 if ram_kb.isdigit() else None
    return facts


_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64"}


def elf_machine(path: Path) -> str | None:
    """The CPU an ELF executable is built for (``aarch64``, ``x86_64``...), None if not ELF."""
    with open(path, "rb") as handle:
        header = handle.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    code = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return _ELF_MACHINES.get(code, f"ELF machine {code}")


def emulation(binaries: dict[str, Path], device_machine: str | None) -> str | None:
    """Why the tools' timings are not the device's, when they are built for another CPU than
    the device's kernel runs: the device can only run them through an emulator."""
    foreign = {
        machine
        for machine in map(elf_machine, binaries.values())
        if machine and device_machine and machine != device_machine
    }
    if not foreign:
        return None
    return (
        f"{', '.join(sorted(foreign))} binaries on a {device_machine} device, through an emulator"
    )


def push_if_changed(adb: Adb, local: Path, remote: str) -> bool:
    """Push ``local`` unless the device already has a file with the same sha256."""
    quoted = shlex.quote(remote)
    there = adb.shell(
        f"if [ -f {quoted} ]; then sha256sum {quoted}; else echo missing; fi",
        what=f"checking {remote}",
        timeout=600,
    ).split()
    if there and there[0] == sha256_file(local):
        return False
    say(f"  pushing {local.name} ({local.stat().st_size / 2**20:.0f} MiB) to {remote}")
    adb.push(local, remote, what=local.name)
    return True


def measured_command(args: list[str]) -> str:
    """A device shell line that runs ``args`` in DEVICE_DIR, printing its output, VmHWM and exit."""
    return (
        f"cd {DEVICE_DIR} && {{ {shlex.join(args)} > bench.out 2> bench.err & pid=$!; hwm=0; "
        "while s=$(cat /proc/$pid/status 2>/dev/null); do "
        "v=$(echo \"$s\" | sed -n 's/^VmHWM:[^0-9]*\\([0-9]*\\).*/\\1/p'); "
        '[ -z "$v" ] && break; hwm=$v; sleep 0.1; done; '
        "wait $pid; rc=$?; cat bench.out; echo; "
        f'echo "{_HWM_MARK}$hwm"; echo "{_EXIT_MARK}$rc"; tail -n 40 bench.err; }}'
    )


def _parse_measured(text: str) -> tuple[str, float | None, int | None, str]:
    """(llama-bench stdout, peak RSS MiB, exit code, stderr tail) from measured_command's output."""
    body, marked, trailer = text.rpartition(_HWM_MARK)
    if not marked:
        return text, None, None, ""
    hwm, _, rest = trailer.partition("\n")
    code_text, _, err = rest.partition(_EXIT_MARK)[2].partition("\n")
    peak = int(hwm) / 1024 if hwm.strip().isdigit() and int(hwm) > 0 else None
    code = int(code_text) if code_text.strip().lstrip("-").isdigit() else None
    return body, peak, code, err.strip()


def run_adb(target: str, request: BenchRequest, *, adb: str = "adb") -> dict[str, Any]:
    """Measure llama.cpp's tools on the device named by ``target`` (``adb`` or ``adb:SERIAL``)."""
    binaries = {
        name: Path(path)
        for name, path in (
            ("llama-bench", request.llama_bench),
            ("llama-completion", request.llama_completion),
        )
        if path
    }
    if not binaries:
        raise InvalidParameterError(
            "the adb target runs llama.cpp's tools built for Android: pass --llama-bench PATH "
            "(pp/tg workloads) and/or --llama-completion PATH (task workloads and adapters); "
            "docs/bench.md says how to build them with the NDK"
        )
    for name, path in binaries.items():
        if not path.is_file():
            raise InvalidParameterError(f"{name} binary not found: {path}")
    tasks = [load_task(task, limit=request.task_limit) for task in request.tasks]
    adapter_files = request.adapters_for("llamacpp")
    for name, file in adapter_files.items():
        if not Path(file).is_file():
            raise InvalidParameterError(f"adapter {name}: file not found: {file}")
    model = models_for("llamacpp", request.models, list(available_backends()))[0][0]
    if model.suffix.lower() != ".gguf":
        raise InvalidParameterError(
            f"the adb target runs llama.cpp: {model.name} is not a GGUF model"
        )

    device = pick_device(adb, target.partition(":")[2] or None)
    facts = device_facts(device)
    facts["emulated"] = emulation(binaries, facts.get("machine"))
    threads = request.threads or min(facts.get("cores") or 4, 4)
    report = new_report(f"adb:{device.serial}", request, threads)
    report["device"] = facts
    say(
        f"device {device.serial}: {facts.get('model')} ({facts['soc']}), Android {facts.get('android')}"
        + (f"; EMULATED: {facts['emulated']}" if facts["emulated"] else "")
    )
    for needed, missing, option in (
        ("pp/tg workloads", request.synthetic and "llama-bench" not in binaries, "--llama-bench"),
        ("task workloads", tasks and "llama-completion" not in binaries, "--llama-completion"),
        ("adapters", adapter_files and "llama-completion" not in binaries, "--llama-completion"),
    ):
        if missing:
            report["skipped"].append(
                {"backend": "llamacpp", "reason": f"{needed} on Android need {option} PATH"}
            )
    if adapter_files and "llama-completion" in binaries:
        report["skipped"].append({
            "backend": "llamacpp",
            "reason": "adapter swap time is not measured on Android: llama-completion loads the "
            "model and adapter afresh for every request",
        })  # fmt: skip

    remote_model = f"{DEVICE_DIR}/{model.name}"
    runs = {}
    where = "device, emulated" if facts["emulated"] else "device"
    if "llama-bench" in binaries and request.synthetic:
        runs["llama-bench"] = llamabench.empty_run(model, threads, label=f"llama-bench ({where})")
    if "llama-completion" in binaries and tasks:
        runs["llama-completion"] = llamabench.empty_run(
            model, threads, runner="llama-completion", label=f"llama-completion ({where})"
        )
    for run in runs.values():
        run["model_size_mb"] = model.stat().st_size / 2**20
        run["rss_source"] = "VmHWM"
        report["runs"].append(run)
    current = next(iter(runs.values()), None)
    try:
        device.shell(f"mkdir -p {DEVICE_DIR}", what="creating the work directory", timeout=60)
        push_if_changed(device, model, remote_model)
        for name in runs:
            device.push(binaries[name], f"{DEVICE_DIR}/{name}", what=name)
            device.shell(f"chmod 755 {DEVICE_DIR}/{name}", what=f"chmod {name}", timeout=60)
        adapters: dict[str | None, str] = {}
        if "llama-completion" in runs:
            for name, file in adapter_files.items():
                adapters[name] = f"{DEVICE_DIR}/adapter-{name}.gguf"
                push_if_changed(device, Path(file), adapters[name])
        if "llama-bench" in runs:
            current = runs["llama-bench"]
            for workload in request.synthetic:
                current["results"].append(
                    _measure(device, remote_model, workload, request, threads, current)
                )
        if "llama-completion" in runs:
            current = runs["llama-completion"]
            for adapter in [None, *adapters]:
                for task in tasks:
                    current["results"].append(
                        _measure_task(
                            device,
                            remote_model,
                            task,
                            adapter,
                            adapters.get(adapter),
                            request,
                            threads,
                            current,
                        )
                    )
    except (TargetError, EdgeGemmaError) as exc:
        if current is None:
            raise
        current["error"] = str(exc)
        say(f"  stopped: {exc}")
    return report


def _checked(device: Adb, args: list[str], what: str, run: dict[str, Any]) -> tuple[str, str]:
    """Run ``args`` in the device's work directory; its stdout and stderr tail. Records VmHWM."""
    text = device.shell(measured_command(args), what=what, timeout=3600)
    out, peak, code, err = _parse_measured(text)
    if code is None:
        if not device.connected():
            raise DeviceDisconnected(f"device {device.serial} disconnected during {what}")
        raise TargetError(f"{what}: the output was cut short: {text[-300:]!r}")
    if code != 0:
        raise TargetError(f"{what}: {args[0]} exited with {code} on the device: {err[-300:]}")
    if peak is not None:
        run["peak_rss_mb"] = max(run["peak_rss_mb"] or 0.0, peak)
    return out, err


def _measure(
    device: Adb,
    model: str,
    workload: Synthetic,
    request: BenchRequest,
    threads: int,
    run: dict[str, Any],
) -> dict[str, Any]:
    args = llamabench.command(
        "./llama-bench",
        model,
        workload,
        repetitions=request.repetitions,
        threads=threads,
        warmup=request.warmup,
    )
    say(f"  [device] {workload.name}: {shlex.join(args)}")
    out, _ = _checked(device, args, workload.name, run)
    return llamabench.result_row(llamabench.parse_output(out), workload)


_PERF = {
    "load_ms": re.compile(r"load time =\s*([\d.]+) ms"),
    "prompt": re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens"),
    "eval": re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs"),
    "total_ms": re.compile(r"total time =\s*([\d.]+) ms"),
}


def parse_perf(text: str) -> dict[str, float]:
    """llama.cpp's closing timings (``llama_perf_context_print``) from a tool's stderr."""
    found: dict[str, float] = {}
    for key, pattern in _PERF.items():
        matches = pattern.findall(text)
        if not matches:
            raise TargetError(f"no '{key}' timing in llama.cpp's output: {text[-300:]!r}")
        last = matches[-1]
        if isinstance(last, tuple):
            found[f"{key}_ms"], found[f"{key}_tokens"] = float(last[0]), float(last[1])
        else:
            found[key] = float(last)
    return found


def _measure_task(
    device: Adb,
    model: str,
    task: Task,
    adapter: str | None,
    adapter_path: str | None,
    request: BenchRequest,
    threads: int,
    run: dict[str, Any],
) -> dict[str, Any]:
    """Each example in its own llama-completion process: timings from llama.cpp's perf print."""
    label = f"{task.name}{' +' + adapter if adapter else ''}"
    perfs, loads, correct = [], [], 0
    requests = [(None, task.examples[0])] * request.warmup + list(enumerate(task.examples))
    for index, example in requests:
        args = ["./llama-completion", "-m", model, "-p", example.prompt_for(adapter), "-n", str(example.max_tokens),
                "--temp", "0", "--seed", "0", "-t", str(threads), "-c", str(request.n_ctx),
                "-no-cnv", "--no-display-prompt"]  # fmt: skip
        if adapter_path:
            args += ["--lora", adapter_path]
        what = (
            f"{label} warm-up"
            if index is None
            else f"{label} request {index + 1}/{len(task.examples)}"
        )
        out, err = _checked(device, args, what, run)
        if index is None:
            continue
        perf = parse_perf(err)
        perfs.append(perf)
        loads.append(perf["load_ms"] / 1000)
        text = out.replace("[end of text]", "")
        for stop in example.stop:
            text = text.split(stop, 1)[0]
        correct += is_correct(text, example.expected)
        say(f"  [device] {what}: {perf['total_ms']:.0f} ms, {correct} correct")
    run["load_s"] = summarize(loads).p50

    def summary(values: list[float]) -> dict[str, Any] | None:
        kept = [v for v in values if v > 0]
        return summarize(kept).to_dict() if kept else None

    return {
        "workload": task.name,
        "kind": "task",
        "adapter": adapter,
        "requests": len(perfs),
        "prompt_tokens": sum(p["prompt_tokens"] for p in perfs) / len(perfs),
        "completion_tokens": sum(p["eval_tokens"] + 1 for p in perfs) / len(perfs),
        "prefill_tps": summary(
            [p["prompt_tokens"] / p["prompt_ms"] * 1000 for p in perfs if p["prompt_ms"]]
        ),
        "decode_tps": summary(
            [p["eval_tokens"] / p["eval_ms"] * 1000 for p in perfs if p["eval_ms"]]
        ),
        "ttft_s": summary([p["prompt_ms"] / 1000 for p in perfs]),
        "latency_s": summary([p["total_ms"] / 1000 for p in perfs]),
        "accuracy": correct / len(perfs),
        "correct": correct,
        "notes": [
            (
                "one llama-completion process per request (load excluded); TTFT is llama.cpp's prompt "
                "evaluation time; generation runs to max_tokens and is cut at the stop strings after"
            )
        ],
    }
