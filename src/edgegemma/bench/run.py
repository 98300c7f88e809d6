"""One backend's measurements, in a process of its own.

    python -m edgegemma.bench.run PLAN.json RESULT.json

The harness starts this module once per backend (and once for the raw llama.cpp loop) so
that the peak resident memory it reports -- VmHWM from ``/proc/self/status``, else
``ru_maxrss`` -- belongs to that runtime alone. It reads a plan (see :class:`Plan`), loads
the model, runs every workload, writes the result as JSON and prints progress on stderr.
When something fails half way, the result holds what was measured so far plus the error.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..files import write_atomically
from ..memory import peak_rss
from .stats import summarize
from .workloads import Synthetic, Task, is_correct, load_task, synthetic_ids

Runner = Literal["engine", "raw", "llama-cpp-python", "server"]
_RUNTIMES = {"llamacpp": "llama_cpp", "onnx": "onnxruntime_genai", "mediapipe": "litert_lm"}


@dataclass(frozen=True)
class Plan:
    runner: Runner
    """``engine``: edgegemma's Engine on ``backend``; ``raw``: the backend's runtime driven
    alone; ``llama-cpp-python``: llama-cpp-python's own high-level API (:mod:`.baseline`);
    ``server``: ``edgegemma serve`` paired with an in-process engine (:mod:`.serving`)."""
    backend: str
    model: str
    n_ctx: int
    threads: int
    """The thread count; the engine uses it only when ``fixed_threads``."""
    repetitions: int
    warmup: int
    seed: int
    ids: Literal["random", "fixed"]
    synthetic: tuple[tuple[str, int], ...]
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    fixed_threads: bool = True
    """False: the engine follows the free cores (its default) instead of ``threads``."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        values = dict(data)
        values["synthetic"] = tuple(tuple(s) for s in values["synthetic"])
        values["tasks"] = tuple(values.get("tasks", ()))
        return cls(**values)

    @property
    def label(self) -> str:
        if self.runner == "raw":
            return f"{self.backend} (runtime alone)"
        if self.runner == "llama-cpp-python":
            return "llama-cpp-python Llama API"
        if self.runner == "server":
            return f"{self.backend} via edgegemma serve"
        return self.backend


class _Stats(Protocol):
    """What both :class:`edgegemma.Stats` and the raw loop's stats provide."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def ttft_s(self) -> float: ...
    @property
    def total_s(self) -> float: ...
    @property
    def prefill_tps(self) -> float: ...
    @property
    def decode_tps(self) -> float: ...


Generate = Callable[[Sequence[int], int], _Stats]


def file_size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    return path.stat().st_size / 2**20


def progress(label: str, message: str) -> None:
    print(f"  [{label}] {message}", file=sys.stderr, flush=True)


def _summary(values: Sequence[float]) -> dict[str, Any] | None:
    kept = [v for v in values if v > 0]
    return summarize(kept).to_dict() if kept else None


def _row(
    workload: str,
    kind: str,
    adapter: str | None,
    stats: Sequence[_Stats],
    *,
    prefill: bool,
    decode: bool,
    notes: list[str],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "workload": workload,
        "kind": kind,
        "adapter": adapter,
        "requests": len(stats),
        "prompt_tokens": sum(s.prompt_tokens for s in stats) / len(stats),
        "completion_tokens": sum(s.completion_tokens for s in stats) / len(stats),
        "prefill_tps": _summary([s.prefill_tps for s in stats]) if prefill else None,
        "decode_tps": _summary([s.decode_tps for s in stats]) if decode else None,
        "ttft_s": _summary([s.ttft_s for s in stats]),
        "latency_s": _summary([s.total_s for s in stats]),
        "accuracy": None,
        "notes": notes,
        **extra,
    }


def measure_synthetic(
    generate: Generate,
    reset: Callable[[], None],
    workload: Synthetic,
    plan: Plan,
    *,
    vocab_size: int,
    bos_id: int | None,
    adapter: str | None = None,
) -> dict[str, Any]:
    stats = []
    total = plan.warmup + plan.repetitions
    for i in range(total):
        reset()
        ids = synthetic_ids(
            workload,
            repetition=i,
            vocab_size=vocab_size,
            bos_id=bos_id,
            ids=plan.ids,
            seed=plan.seed,
        )
        result = generate(ids, workload.max_tokens)
        if i >= plan.warmup:
            stats.append(result)
        what = "warm-up" if i < plan.warmup else f"{i - plan.warmup + 1}/{plan.repetitions}"
        progress(
            plan.label,
            f"{workload.name}{_adapter_note(adapter)} {what}: {result.total_s * 1000:.0f} ms",
        )
    notes = []
    short = [s.completion_tokens for s in stats if s.completion_tokens < workload.max_tokens]
    if short:
        notes.append(
            f"{len(short)} of {len(stats)} repetitions hit an end token early "
            f"(generated {min(short)}..{max(short)} of {workload.max_tokens})"
        )
    return _row(
        workload.name,
        workload.kind,
        adapter,
        stats,
        prefill=workload.kind == "pp",
        decode=workload.kind == "tg",
        notes=notes,
    )


def measure_task(engine: Any, task: Task, plan: Plan, adapter: str | None) -> dict[str, Any]:
    adapters = {adapter: 1.0} if adapter else None
    examples = task.examples
    stats, correct = [], 0
    for i, example in enumerate(examples[: plan.warmup]):
        engine.generate(
            example.prompt_for(adapter),
            max_tokens=example.max_tokens,
            stop=list(example.stop),
            adapters=adapters,
        )
        progress(plan.label, f"{task.name}{_adapter_note(adapter)} warm-up {i + 1}/{plan.warmup}")
    # The warm-up warms the runtime, not the KV cache: the first measured request pays for
    # the prompt's shared prefix as a first request does, the later ones reuse it.
    engine.reset()
    for i, example in enumerate(examples):
        result = engine.generate(
            example.prompt_for(adapter),
            max_tokens=example.max_tokens,
            stop=list(example.stop),
            adapters=adapters,
        )
        stats.append(result.stats)
        correct += is_correct(result.text, example.expected)
        if (i + 1) % 10 == 0 or i + 1 == len(examples):
            progress(
                plan.label,
                f"{task.name}{_adapter_note(adapter)} {i + 1}/{len(examples)}: {correct} correct",
            )
    row = _row(
        task.name,
        "task",
        adapter,
        stats,
        prefill=True,
        decode=True,
        notes=[],
        cached_tokens=sum(s.cached_tokens for s in stats) / len(stats),
    )
    row["accuracy"] = correct / len(examples)
    row["correct"] = correct
    return row


def measure_classify(
    engine: Any, task: Task, plan: Plan, adapter: str | None
) -> dict[str, Any] | None:
    """The task as a classification (one prefill, each label scored), then all of it at once
    with ``classify_many``: accuracy, latency and throughput next to the generate path."""
    labels = task.labels
    if labels is None or not engine.features.score:
        return None
    adapters = {adapter: 1.0} if adapter else None
    prompts = [example.prompt_for(adapter) for example in task.examples]
    for prompt in prompts[: plan.warmup]:
        engine.classify(prompt, labels, adapters=adapters)
    latencies, correct = [], 0
    for prompt, example in zip(prompts, task.examples):
        started = time.perf_counter()
        found = engine.classify(prompt, labels, adapters=adapters)
        latencies.append(time.perf_counter() - started)
        correct += is_correct(found.label, example.expected)
    started = time.perf_counter()
    engine.classify_many(prompts, labels, adapters=adapters)
    batch_s = time.perf_counter() - started
    progress(
        plan.label,
        f"{task.name} classify{_adapter_note(adapter)}: {correct}/{len(prompts)} correct",
    )
    summary = summarize(latencies).to_dict()
    return {
        "workload": f"{task.name} (classify)",
        "kind": "task",
        "adapter": adapter,
        "requests": len(prompts),
        "prompt_tokens": None,
        "completion_tokens": 0,
        "prefill_tps": None,
        "decode_tps": None,
        "ttft_s": summary,
        "latency_s": summary,
        "accuracy": correct / len(prompts),
        "correct": correct,
        "notes": [f"classify_many: {len(prompts) / batch_s:.1f} requests/s"],
        "batch_requests_per_s": len(prompts) / batch_s,
    }


def measure_adapter_swap(
    engine: Any, name: str, path: str, prompt: str | list[int], plan: Plan
) -> dict[str, Any]:
    """Adapter load time, and the first token after a swap against the same without one.

    A swap changes the adapter set the KV cache was computed under, so the engine must
    evaluate the whole prompt again: ``swap`` is set + full prefill + first token.
    ``no_swap_cold`` is the same prompt under the same adapter from an empty cache (so
    ``swap - no_swap_cold`` is the cost of the swap itself) and ``no_swap_cached`` the same
    call again with the prompt's KV reused (what a swap gives up).
    """
    loads, swap, cold, cached = [], [], [], []
    adapter = {name: 1.0}
    for i in range(plan.warmup + plan.repetitions):
        engine.unload_adapter(name)
        started = time.perf_counter()
        engine.load_adapter(name, path)
        load_s = time.perf_counter() - started
        engine.generate(prompt, max_tokens=1, adapters=None)
        swapped = engine.generate(prompt, max_tokens=1, adapters=adapter).stats.ttft_s
        reused = engine.generate(prompt, max_tokens=1, adapters=adapter).stats.ttft_s
        engine.reset()
        fresh = engine.generate(prompt, max_tokens=1, adapters=adapter).stats.ttft_s
        if i >= plan.warmup:
            loads.append(load_s)
            swap.append(swapped)
            cached.append(reused)
            cold.append(fresh)
        progress(
            plan.label,
            f"swap to {name}: {swapped * 1000:.1f} ms "
            f"(no swap: {fresh * 1000:.1f} ms cold, {reused * 1000:.1f} ms cached)",
        )
    return {
        "adapter": name,
        "path": path,
        "load_s": summarize(loads).to_dict(),
        "swap_first_token_s": summarize(swap).to_dict(),
        "no_swap_cold_first_token_s": summarize(cold).to_dict(),
        "no_swap_cached_first_token_s": summarize(cached).to_dict(),
    }


def _adapter_note(adapter: str | None) -> str:
    return f" +{adapter}" if adapter else ""


def _run_engine(plan: Plan, result: dict[str, Any]) -> None:
    import edgegemma
    from edgegemma.backends import get_backend

    get_backend(plan.backend)  # import the runtime first: load_s is the model's load alone
    started = time.perf_counter()
    engine = edgegemma.load(
        plan.model,
        backend=plan.backend,
        n_ctx=plan.n_ctx,
        n_threads=plan.threads if plan.fixed_threads else None,
    )
    result["load_s"] = time.perf_counter() - started
    result["model_description"] = engine.info.description
    progress(plan.label, f"loaded {Path(plan.model).name} in {result['load_s']:.2f} s")
    with engine:
        for name, path in plan.adapters.items():
            engine.load_adapter(name, path)
        tasks = [load_task(source, limit=plan.task_limit) for source in plan.tasks]
        for adapter in [None, *plan.adapters]:
            adapters = {adapter: 1.0} if adapter else None

            def generate(
                ids: Sequence[int], max_tokens: int, adapters: dict | None = adapters
            ) -> _Stats:
                return engine.generate(ids, max_tokens=max_tokens, adapters=adapters).stats

            for kind, tokens in plan.synthetic:
                workload = Synthetic(kind, tokens)  # type: ignore[arg-type]
                result["results"].append(
                    measure_synthetic(
                        generate,
                        engine.reset,
                        workload,
                        plan,
                        vocab_size=engine.info.vocab_size,
                        bos_id=engine.info.bos_id,
                        adapter=adapter,
                    )
                )
            for task in tasks:
                result["results"].append(measure_task(engine, task, plan, adapter))
                classified = measure_classify(engine, task, plan, adapter)
                if classified is not None:
                    result["results"].append(classified)
        swap_prompt: str | list[int] = (
            tasks[0].examples[0].prompt
            if tasks
            else synthetic_ids(
                Synthetic("pp", 128), repetition=0, vocab_size=engine.info.vocab_size,
                bos_id=engine.info.bos_id, ids="fixed", seed=plan.seed,
            )
        )  # fmt: skip
        for name, path in plan.adapters.items():
            result["adapter_swaps"].append(
                measure_adapter_swap(engine, name, path, swap_prompt, plan)
            )


def _run_reference(plan: Plan, result: dict[str, Any]) -> None:
    import importlib

    from .baseline import open_loop

    importlib.import_module(_RUNTIMES[plan.backend])  # first: load_s is the model's load alone
    started = time.perf_counter()
    loop = open_loop(
        plan.runner, plan.backend, Path(plan.model), n_ctx=plan.n_ctx, n_threads=plan.threads
    )
    result["load_s"] = time.perf_counter() - started
    progress(plan.label, f"loaded {Path(plan.model).name} in {result['load_s']:.2f} s")
    with loop:
        for kind, tokens in plan.synthetic:
            result["results"].append(
                measure_synthetic(
                    loop.generate,
                    lambda: None,  # the reference loops clear their cache on every call
                    Synthetic(kind, tokens),  # type: ignore[arg-type]
                    plan,
                    vocab_size=loop.vocab_size,
                    bos_id=loop.bos_id,
                )
            )


def _run_server(plan: Plan, result: dict[str, Any]) -> None:
    import edgegemma

    from .serving import measure_server, served

    started = time.perf_counter()
    engine = edgegemma.load(
        plan.model, backend=plan.backend, n_ctx=plan.n_ctx, n_threads=plan.threads
    )
    result["load_s"] = time.perf_counter() - started
    with engine, served(plan) as connection:
        for kind, tokens in plan.synthetic:
            result["results"].append(
                measure_server(
                    engine,
                    connection,
                    Synthetic(kind, tokens),  # type: ignore[arg-type]
                    plan,
                    lambda message: progress(plan.label, message),
                )
            )


def empty_result(plan: Plan) -> dict[str, Any]:
    """A result with nothing measured yet."""
    model = Path(plan.model)
    return {
        "backend": plan.backend,
        "runner": plan.runner,
        "label": plan.label,
        "model": model.name,
        "model_path": str(model),
        "model_size_mb": file_size_mb(model) if model.exists() else None,
        "threads": plan.threads,
        "n_ctx": plan.n_ctx,
        "load_s": None,
        "peak_rss_mb": None,
        "rss_source": None,
        "results": [],
        "adapter_swaps": [],
        "error": None,
    }


def run(plan: Plan) -> dict[str, Any]:
    """Measure everything the plan asks for; never raises (the error goes in the result)."""
    result = empty_result(plan)
    try:
        if plan.runner == "engine":
            _run_engine(plan, result)
        elif plan.runner == "server":
            _run_server(plan, result)
        else:
            _run_reference(plan, result)
    except Exception as exc:  # noqa: BLE001 -- reported in the result, with what was measured
        result["error"] = f"{type(exc).__name__}: {exc}"
        progress(plan.label, f"failed: {result['error']}")
        traceback.print_exc(file=sys.stderr)
    result["peak_rss_mb"], result["rss_source"] = peak_rss()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m edgegemma.bench.run PLAN.json RESULT.json", file=sys.stderr)
        return 2
    plan = Plan.from_dict(json.loads(Path(args[0]).read_text()))
    result = run(plan)
    write_atomically(Path(args[1]), json.dumps(result))
    return 1 if result["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
