"""Where the bench runs: this machine, a Linux box over ssh, or an Android device over adb.

``local`` starts one fresh process per backend (``python -m edgegemma.bench.run``), plus one
for the raw llama.cpp loop, and one llama-bench process per workload when given one.
``ssh://[user@]host[:port]`` runs the same harness on the remote machine (which has edgegemma
installed) with the same options and ``--json -``, and brings that report back: every path
in the options (models, adapters, task files, llama-bench) is a path on the remote machine.
``adb[:SERIAL]`` is in :mod:`edgegemma.bench.adb`.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ..backends import available_backends, get_backend
from ..errors import BackendUnavailableError, EdgeGemmaError, InvalidParameterError
from ..threads import default_threads
from . import llamabench
from .hostinfo import host_info
from .report import engine_overhead, failed
from .run import Plan, empty_result
from .schema import SCHEMA_ID
from .workloads import Synthetic, load_task


class TargetError(EdgeGemmaError):
    """A bench target (ssh host, adb device) could not be reached or failed half way."""


@dataclass(frozen=True)
class BenchRequest:
    """Everything a bench run measures, independent of where it runs."""

    backends: tuple[str, ...] = ()
    """Backends to measure; empty: every registered backend whose runtime is installed."""
    models: tuple[str, ...] = ()
    """``NAME_OR_PATH`` (for every backend that opens it) or ``BACKEND=NAME_OR_PATH``."""
    adapters: tuple[tuple[str, str, str], ...] = ()
    """``(backend, name, path)``; backend ``""`` means every backend."""
    pp: tuple[int, ...] = (128,)
    tg: tuple[int, ...] = (32,)
    tasks: tuple[str, ...] = ("sensor",)
    task_limit: int | None = None
    repetitions: int = 5
    warmup: int = 1
    threads: int | None = None
    n_ctx: int = 2048
    seed: int = 0
    ids: Literal["random", "fixed"] = "random"
    baseline: bool = True
    server: bool = False
    """Also measure the synthetic workloads through ``edgegemma serve`` (its overhead)."""
    llama_bench: str | None = None
    llama_completion: str | None = None
    """adb target only: llama.cpp's llama-completion, for task workloads and adapters."""

    def adapters_for(self, backend: str) -> dict[str, str]:
        """Adapter paths by name for ``backend``: its own, else the ones for every backend.

        An empty path names a shipped skill (:mod:`edgegemma.skills`), whose file for
        ``backend`` is found (or converted) on the machine that measures.
        """
        from .. import skills

        found = {name: path for scope, name, path in self.adapters if not scope}
        found.update({name: path for scope, name, path in self.adapters if scope == backend})
        return {
            name: path or str(skills.adapter_path(name, backend)) for name, path in found.items()
        }

    @property
    def synthetic(self) -> list[Synthetic]:
        return [Synthetic("pp", n) for n in self.pp] + [Synthetic("tg", n) for n in self.tg]

    def to_argv(self) -> list[str]:
        """The command-line options that make the same request (for a remote harness)."""
        argv: list[str] = []
        for backend in self.backends:
            argv += ["--backend", backend]
        for model in self.models:
            argv += ["--model", model]
        for backend, name, path in self.adapters:
            spec = f"{name}={path}" if path else name
            argv += ["--adapter", f"{backend}:{spec}" if backend else spec]
        argv += ["-p", ",".join(map(str, self.pp)) or "0", "-n", ",".join(map(str, self.tg)) or "0"]
        for task in self.tasks or ("none",):
            argv += ["--task", task]
        if self.task_limit is not None:
            argv += ["--task-limit", str(self.task_limit)]
        argv += [
            "-r",
            str(self.repetitions),
            "--warmup",
            str(self.warmup),
            "--n-ctx",
            str(self.n_ctx),
        ]
        argv += ["--seed", str(self.seed), "--ids", self.ids]
        if self.threads is not None:
            argv += ["-t", str(self.threads)]
        if not self.baseline:
            argv.append("--no-baseline")
        if self.server:
            argv.append("--server")
        if self.llama_bench:
            argv += ["--llama-bench", self.llama_bench]
        if self.llama_completion:
            argv += ["--llama-completion", self.llama_completion]
        return argv


def new_report(target: str, request: BenchRequest, threads: int | str) -> dict[str, Any]:
    settings = asdict(request)
    settings["threads"] = threads
    return {
        "schema": SCHEMA_ID,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": target,
        "host": host_info(),
        "device": None,
        "settings": settings,
        "runs": [],
        "overhead": [],
        "skipped": [],
        "errors": [],
    }


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- models per backend ----------------------------------------------------------------


def split_model_specs(
    specs: Sequence[str], backends: Sequence[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """``BACKEND=MODEL`` specs by backend, and the specs meant for every backend."""
    per_backend: dict[str, list[str]] = {}
    general = []
    for spec in specs:
        name, sep, model = spec.partition("=")
        if sep and name in backends:
            per_backend.setdefault(name, []).append(model)
        else:
            general.append(spec)
    return per_backend, general


def models_for(
    backend: str, specs: Sequence[str], known_backends: Sequence[str]
) -> tuple[list[Path], bool]:
    """The models ``backend`` measures, and whether they are the implicit default.

    ``BACKEND=MODEL`` specs name one backend's models; the other specs go to every backend
    without its own. Without specs every backend gets its default model and opens it as
    ``edgegemma.load(backend=...)`` would (:func:`edgegemma.models.default_model`).
    """
    from .. import models

    per_backend, general = split_model_specs(specs, known_backends)
    wanted = per_backend.get(backend) or general
    if wanted:
        return [models.resolve(spec) for spec in wanted], False
    return [models.resolve(models.default_model(backend))], True


# -- local -----------------------------------------------------------------------------


def run_plan(plan: Plan) -> dict[str, Any]:
    """Run ``plan`` in a fresh Python process and return its result."""
    with tempfile.TemporaryDirectory(prefix="edgegemma-bench-") as folder:
        plan_file, result_file = Path(folder, "plan.json"), Path(folder, "result.json")
        plan_file.write_text(json.dumps(asdict(plan)))
        # The child's stdout goes to our stderr (fd 2): stdout may carry the JSON report.
        done = subprocess.run(
            [sys.executable, "-m", "edgegemma.bench.run", str(plan_file), str(result_file)],
            stdin=subprocess.DEVNULL,
            stdout=2,
            check=False,
        )
        if result_file.exists():
            return json.loads(result_file.read_text())
    why = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    result = empty_result(plan)
    result["error"] = f"the measuring process died ({why}) before writing a result"
    return result


def run_local(request: BenchRequest) -> dict[str, Any]:
    """Measure every requested backend on this machine."""
    known = list(available_backends())
    wanted = list(request.backends) or known
    unknown = [b for b in wanted if b not in known]
    if unknown:
        raise InvalidParameterError(
            f"unknown backend {', '.join(unknown)}; known: {', '.join(known)}"
        )
    # Bad input fails here, before any model is loaded.
    for task in request.tasks:
        load_task(task, limit=request.task_limit)
    for _, name, file in request.adapters:
        if file and not Path(file).is_file():
            raise InvalidParameterError(f"adapter {name}: file not found: {file}")
    threads = request.threads or default_threads()
    report = new_report("local", request, threads)
    chosen = []
    for backend in wanted:
        try:
            get_backend(backend)
        except BackendUnavailableError as exc:
            report["skipped"].append({"backend": backend, "reason": str(exc)})
            say(f"skipping {backend}: {exc}")
            continue
        chosen.append((backend, *models_for(backend, request.models, known)))
    for backend, paths, implicit in chosen:
        for path in paths:
            plan = Plan(
                runner="engine",
                backend=backend,
                model=str(path),
                n_ctx=request.n_ctx,
                threads=threads,
                fixed_threads=request.threads is not None,
                repetitions=request.repetitions,
                warmup=request.warmup,
                seed=request.seed,
                ids=request.ids,
                synthetic=tuple((w.kind, w.tokens) for w in request.synthetic),
                tasks=request.tasks,
                task_limit=request.task_limit,
                adapters=request.adapters_for(backend),
            )
            say(f"{backend}: {path.name}, {threads} threads")
            result = run_plan(plan)
            if implicit and result["error"] and result["load_s"] is None:
                # Not asked for by name: a backend that cannot open the default model is skipped.
                reason = f"cannot open {path.name} ({result['error']}); pass --model {backend}=PATH"
                report["skipped"].append({"backend": backend, "reason": reason})
                say(f"skipping {backend}: {reason}")
                continue
            report["runs"].append(result)
            if request.baseline and request.synthetic:
                references = ["raw", "llama-cpp-python"] if backend == "llamacpp" else ["raw"]
                for runner in references:
                    reference = Plan(
                        **{**asdict(plan), "runner": runner, "tasks": (), "adapters": {}}
                    )
                    say(f"{reference.label}: {path.name}, {threads} threads")
                    report["runs"].append(run_plan(reference))
            if request.server and request.synthetic:
                through = Plan(**{**asdict(plan), "runner": "server", "tasks": (), "adapters": {}})
                say(f"{through.label}: {path.name}, {threads} threads")
                report["runs"].append(run_plan(through))
            if backend == "llamacpp":
                _run_llama_bench(request, path, threads, report)
    tool = request.llama_bench or shutil.which("llama-bench")
    if tool and "llamacpp" in wanted and "llamacpp" not in [b for b, *_ in chosen]:
        # llama.cpp's own tool needs no Python binding: a board with the tool built but no
        # llama-cpp-python still gets its rows.
        for path in models_for("llamacpp", request.models, known)[0]:
            _run_llama_bench(request, path, threads, report)
    report["overhead"] = engine_overhead(report["runs"])
    return report


def _run_llama_bench(
    request: BenchRequest, model: Path, threads: int, report: dict[str, Any]
) -> None:
    llama_bench = request.llama_bench or shutil.which("llama-bench")
    if not (llama_bench and request.synthetic):
        return
    say(f"llama-bench: {model.name}, {threads} threads")
    report["runs"].append(
        llamabench.run_local(
            llama_bench,
            model,
            request.synthetic,
            repetitions=request.repetitions,
            threads=threads,
            warmup=request.warmup,
        )
    )


# -- ssh -------------------------------------------------------------------------------


def ssh_command(
    target: str, request: BenchRequest, *, remote_python: str, options: Sequence[str]
) -> list[str]:
    parts = urlsplit(target)
    if parts.scheme != "ssh" or not parts.hostname:
        raise InvalidParameterError(
            f"an ssh target looks like ssh://[user@]host[:port], got {target!r}"
        )
    destination = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
    args = ["ssh", "-o", "BatchMode=yes"]
    for option in options:
        args += ["-o", option]
    if parts.port:
        args += ["-p", str(parts.port)]
    remote = [remote_python, "-m", "edgegemma.bench", *request.to_argv(), "--json", "-"]
    return [*args, destination, "--", shlex.join(remote)]


def run_ssh(
    target: str,
    request: BenchRequest,
    *,
    remote_python: str = "python3",
    options: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the harness on ``target`` and return its report, its progress relayed live."""
    args = ssh_command(target, request, remote_python=remote_python, options=options)
    say(f"running on {target}: {shlex.join(args[args.index('--') + 1 :])}")
    try:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise TargetError(f"cannot run ssh: {exc}") from None
    tail: deque[str] = deque(maxlen=15)
    relay = threading.Thread(target=_relay, args=(process.stderr, tail, target), daemon=True)
    relay.start()
    out = process.stdout.read() if process.stdout else b""
    code = process.wait()
    relay.join()
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA_ID:
        what = "ssh could not connect" if code == 255 else f"the remote harness exited with {code}"
        detail = " | ".join(tail) or "no output"
        raise TargetError(f"{target}: {what} and sent no report: {detail}")
    report["target"] = target
    if code != 0 and not failed(report):
        report["errors"].append(f"the remote harness exited with {code}")
    return report


def _relay(stream: Any, tail: deque[str], target: str) -> None:
    host = urlsplit(target).hostname
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        tail.append(line)
        say(f"{host}| {line}")
