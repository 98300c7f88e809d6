"""`edgegemma serve` under load: clients arriving one after another, for several --parallel.

    python benchmarks/serve_load.py [--model gemma3-270m] [--parallel 1 8] [--clients 16]
        [--interval 0.2] [--max-tokens 64] [--rounds 2] [--json FILE]

For each round and each ``--parallel`` value (alternated, so drift in a shared machine's load
hits all alike) a fresh server runs on 127.0.0.1 and ``--clients`` completion requests arrive
``--interval`` seconds apart, each its own prompt, greedy, ``--max-tokens`` tokens. Reported
per setting: latency p50/p90 from sending a request to its whole answer, tokens per second
over the whole run (all completion tokens / first send to last answer), and the largest
batch a request ran in.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = [
    "The capital of France is",
    "Once upon a time there",
    "Water boils at",
    "My favourite food is",
    "The best way to learn a language is",
    "In the morning I usually",
    "The ocean is",
    "A good book should",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(model: str, parallel: int, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgegemma", "serve", "--model", model, "--name", "bench", "--port", str(port),
         "--threads", str(threads), "--parallel", str(parallel)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def load(url: str, clients: int, interval: float, max_tokens: list[int]) -> dict[str, float]:
    """Send the requests on schedule; wait for every answer."""
    answers: list[tuple[float, int, int]] = []  # latency s, completion tokens, batch size
    lock = threading.Lock()

    def ask(i: int) -> None:
        body = {"model": "bench", "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})",
                "max_tokens": max_tokens[i % len(max_tokens)], "temperature": 0}  # fmt: skip
        sent = time.perf_counter()
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
        latency = time.perf_counter() - sent
        data = reply.json()
        with lock:
            answers.append(
                (latency, data["usage"]["completion_tokens"], data["timings"]["batch_n"])
            )

    # Warm the server (first-request costs) before the clock starts.
    httpx.post(f"{url}/v1/completions", json={"model": "bench", "prompt": "Hi", "max_tokens": 4},
               timeout=600).raise_for_status()  # fmt: skip
    threads = []
    started = time.perf_counter()
    for i in range(clients):
        thread = threading.Thread(target=ask, args=(i,))
        thread.start()
        threads.append(thread)
        time.sleep(interval)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies = sorted(a[0] for a in answers)
    return {
        "latency_p50_s": statistics.median(latencies),
        "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        "tokens_per_s": sum(a[1] for a in answers) / wall,
        "largest_batch": max(a[2] for a in answers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m-embed-iq4_nl")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument(
        "--max-tokens",
        type=int,
        nargs="+",
        default=[64],
        help="client i asks for the i-th, cycling",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args(argv)

    from edgegemma import models

    model = str(models.resolve(options.model))
    runs: dict[int, list[dict[str, float]]] = {p: [] for p in options.parallel}
    for round_ in range(options.rounds):
        order = options.parallel if round_ % 2 == 0 else options.parallel[::-1]
        for parallel in order:
            process, url = start(model, parallel, options.threads)
            try:
                runs[parallel].append(
                    load(url, options.clients, options.interval, options.max_tokens)
                )
            finally:
                process.terminate()
                process.wait(timeout=30)
            print(f"round {round_ + 1} --parallel {parallel}: {runs[parallel][-1]}", flush=True)
    print(f"\n{options.clients} clients {options.interval} s apart, {options.max_tokens} tokens each, "
          f"{options.rounds} rounds (medians)")  # fmt: skip
    print("| --parallel | latency p50 / p90 s | tok/s in all | largest batch |")
    print("| --- | --- | --- | --- |")
    summary = {}
    for parallel, found in runs.items():
        median = {key: statistics.median(r[key] for r in found) for key in found[0]}
        summary[parallel] = median
        print(f"| {parallel} | {median['latency_p50_s']:.2f} / {median['latency_p90_s']:.2f} "
              f"| {median['tokens_per_s']:.1f} | {median['largest_batch']:.0f} |")  # fmt: skip
    if options.json:
        options.json.write_text(json.dumps({"settings": vars(options) | {"json": str(options.json)},
                                            "runs": runs, "medians": summary}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
