"""The server runner: each synthetic workload through ``edgegemma serve`` on localhost, paired
with the same request on an in-process engine, so that the difference is the server's cost.

The server runs in its own process (as a user runs it) on the same model, threads and
context; the two sides take turns, request by request, in alternating order, and see the same
requests in the same sequence, so their KV caches are in the same state. The client is the
standard library's keep-alive HTTP connection: what is measured is the server, not a client
library.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import EdgeGemmaError
from .stats import summarize
from .workloads import Synthetic, synthetic_ids

MODEL_ID = "bench"
_START_TIMEOUT_S = 300


@dataclass(frozen=True)
class _Timed:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    prefill_tps: float = 0.0
    decode_tps: float = 0.0


@contextmanager
def served(plan: Any) -> Iterator[http.client.HTTPConnection]:
    """An ``edgegemma serve`` process of the plan's model, and a connection to it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "edgegemma", "serve", "--model", plan.model,
        "--backend", plan.backend, "--name", MODEL_ID, "--port", str(port),
        "--n-ctx", str(plan.n_ctx), "--threads", str(plan.threads),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=2, stderr=2)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise EdgeGemmaError(f"edgegemma serve exited with code {process.returncode}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                connection.request("GET", "/health")
                if connection.getresponse().read() and connection.sock is not None:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise EdgeGemmaError("edgegemma serve did not start") from None
                time.sleep(0.2)
        yield connection
        connection.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _post(connection: http.client.HTTPConnection, ids: Sequence[int], max_tokens: int) -> _Timed:
    body = json.dumps(
        {"model": MODEL_ID, "prompt": list(ids), "max_tokens": max_tokens, "temperature": 0}
    )
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise EdgeGemmaError(f"the server answered {response.status}: {data[:300]!r}")
    usage = json.loads(data)["usage"]
    return _Timed(usage["prompt_tokens"], usage["completion_tokens"], elapsed, elapsed)


def measure_server(
    engine: Any,
    connection: http.client.HTTPConnection,
    workload: Synthetic,
    plan: Any,
    progress: Any,
) -> dict[str, Any]:
    """One workload, request by request on both sides: the row of the server's latencies,
    with the engine's and their paired differences."""
    over_http, in_process = [], []
    for i in range(plan.warmup + plan.repetitions):
        ids = synthetic_ids(
            workload, repetition=i, vocab_size=engine.info.vocab_size,
            bos_id=engine.info.bos_id, ids=plan.ids, seed=plan.seed,
        )  # fmt: skip
        sides = []
        for side in ("engine", "server") if i % 2 == 0 else ("server", "engine"):
            if side == "server":
                sides.append(("server", _post(connection, ids, workload.max_tokens)))
            else:
                started = time.perf_counter()
                result = engine.generate(ids, max_tokens=workload.max_tokens, temperature=0.0)
                elapsed = time.perf_counter() - started
                sides.append(("engine", _Timed(
                    result.stats.prompt_tokens, result.stats.completion_tokens, elapsed, elapsed
                )))  # fmt: skip
        timed = dict(sides)
        if i >= plan.warmup:
            over_http.append(timed["server"])
            in_process.append(timed["engine"])
        progress(
            f"{workload.name} {i + 1}: server {timed['server'].total_s * 1000:.1f} ms, "
            f"engine {timed['engine'].total_s * 1000:.1f} ms"
        )
    added = [s.total_s - e.total_s for s, e in zip(over_http, in_process)]
    latency = summarize([s.total_s for s in over_http]).to_dict()
    overhead = summarize(added).to_dict()
    return {
        "workload": workload.name,
        "kind": workload.kind,
        "adapter": None,
        "requests": len(over_http),
        "prompt_tokens": sum(s.prompt_tokens for s in over_http) / len(over_http),
        "completion_tokens": sum(s.completion_tokens for s in over_http) / len(over_http),
        "prefill_tps": None,
        "decode_tps": None,
        "ttft_s": None,
        "latency_s": latency,
        "accuracy": None,
        "notes": [],
        "engine_latency_s": summarize([e.total_s for e in in_process]).to_dict(),
        "overhead_s": overhead,
    }
