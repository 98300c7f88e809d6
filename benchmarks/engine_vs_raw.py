"""Engine overhead: edgegemma's Engine against a raw llama-cpp-python decode loop.

    python benchmarks/engine_vs_raw.py [--model gemma3-270m] [--rounds 10] [--pp 128] [--tg 64]

Two worker processes load the same model, one behind ``edgegemma.load`` and one driven by
:class:`edgegemma.bench.baseline.RawLoop` (llama_decode + a greedy sampler, no engine), with
the same context parameters and thread count. The parent then alternates requests between
them (engine first in even rounds, raw first in odd ones), so drift in a shared machine's
load hits both alike; each worker's peak RSS is its own process's. Reported: decode tok/s
(tg), prefill tok/s and TTFT (pp) as medians over rounds, the median of the per-round ratios,
and the overhead against the target of <= 3% decode tok/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_OVERHEAD = 0.03


def worker(kind: str, backend: str, model: str, n_ctx: int, threads: int) -> int:
    """Serve requests on stdin ('pp N ROUND' / 'tg N ROUND' / 'quit'), one JSON line each."""
    from edgegemma.bench.workloads import Synthetic, synthetic_ids
    from edgegemma.memory import peak_rss

    started = time.perf_counter()
    if kind == "engine":
        import edgegemma

        engine = edgegemma.load(model, backend=backend, n_ctx=n_ctx, n_threads=threads)
        vocab, bos = engine.info.vocab_size, engine.info.bos_id

        def generate(ids, max_tokens):
            engine.reset()
            return engine.generate(ids, max_tokens=max_tokens).stats
    else:
        from edgegemma.bench.baseline import open_loop

        loop = open_loop("raw", backend, Path(model), n_ctx=n_ctx, n_threads=threads)
        vocab, bos, generate = loop.vocab_size, loop.bos_id, loop.generate
    print(json.dumps({"load_s": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            print(json.dumps({"peak_rss_mb": peak_rss()[0]}), flush=True)
            return 0
        workload = Synthetic(command[0], int(command[1]))  # type: ignore[arg-type]
        ids = synthetic_ids(
            workload, repetition=int(command[2]), vocab_size=vocab, bos_id=bos, ids="random", seed=0
        )
        stats = generate(ids, workload.max_tokens)
        print(json.dumps({
            "ttft_s": stats.ttft_s, "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps,
            "completion_tokens": stats.completion_tokens,
        }), flush=True)  # fmt: skip
    return 0


class Worker:
    def __init__(self, kind: str, args: argparse.Namespace, model: str):
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, "--backend", args.backend, "--model", model,
             "--n-ctx", str(args.n_ctx), "-t", str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.load_s = self._reply()["load_s"]

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.kind} worker died")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._reply()

    def finish(self) -> float:
        peak = self.ask("quit")["peak_rss_mb"]
        self.process.wait()
        return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the backend's default model")
    parser.add_argument("--backend", default="llamacpp")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--worker", choices=("engine", "raw"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from edgegemma import models
    from edgegemma.threads import default_threads

    args.threads = args.threads or default_threads()
    model = str(models.resolve(args.model or models.default_model(args.backend)))
    if args.worker:
        return worker(args.worker, args.backend, model, args.n_ctx, args.threads)

    print(
        f"model {Path(model).name}, {args.threads} threads, n_ctx {args.n_ctx}, {args.rounds} rounds",
        file=sys.stderr,
    )
    workers = {"engine": Worker("engine", args, model), "raw": Worker("raw", args, model)}
    results: dict[str, dict[str, list[dict]]] = {k: {"pp": [], "tg": []} for k in workers}
    for warm in ("pp", "tg"):
        for w in workers.values():
            w.ask(f"{warm} {args.pp if warm == 'pp' else args.tg} -1")
    for round_ in range(args.rounds):
        order = ("engine", "raw") if round_ % 2 == 0 else ("raw", "engine")
        for kind, size in (("pp", args.pp), ("tg", args.tg)):
            for name in order:
                results[name][kind].append(workers[name].ask(f"{kind} {size} {round_}"))
        print(f"  round {round_ + 1}/{args.rounds}", file=sys.stderr)
    peaks = {name: w.finish() for name, w in workers.items()}

    def figures(kind: str, metric: str) -> dict:
        engine = [r[metric] for r in results["engine"][kind]]
        raw = [r[metric] for r in results["raw"][kind]]
        return {
            "engine_median": statistics.median(engine),
            "raw_median": statistics.median(raw),
            "ratio_of_medians": statistics.median(engine) / statistics.median(raw),
            "median_round_ratio": statistics.median(e / r for e, r in zip(engine, raw)),
            "engine_cv": statistics.stdev(engine) / statistics.mean(engine)
            if len(engine) > 1
            else 0.0,
            "raw_cv": statistics.stdev(raw) / statistics.mean(raw) if len(raw) > 1 else 0.0,
        }

    summary = {
        "model": Path(model).name,
        "threads": args.threads,
        "rounds": args.rounds,
        f"tg{args.tg}_decode_tps": figures("tg", "decode_tps"),
        f"pp{args.pp}_prefill_tps": figures("pp", "prefill_tps"),
        f"pp{args.pp}_ttft_s": figures("pp", "ttft_s"),
        "load_s": {name: w.load_s for name, w in workers.items()},
        "peak_rss_mb": peaks,
    }
    decode = summary[f"tg{args.tg}_decode_tps"]
    overhead = 1 - decode["median_round_ratio"]
    summary["decode_overhead"] = overhead
    summary["target_met"] = overhead <= TARGET_OVERHEAD

    print(
        f"{'metric':<22}{'engine':>10}{'raw loop':>10}{'ratio':>8}{'per-round':>11}{'spread e/r':>14}"
    )
    for key in (f"tg{args.tg}_decode_tps", f"pp{args.pp}_prefill_tps", f"pp{args.pp}_ttft_s"):
        f = summary[key]
        scale = 1000 if key.endswith("ttft_s") else 1
        print(
            f"{key:<22}{f['engine_median'] * scale:>10.1f}{f['raw_median'] * scale:>10.1f}"
            f"{f['ratio_of_medians']:>8.3f}{f['median_round_ratio']:>11.3f}"
            f"{f['engine_cv'] * 100:>8.0f}%/{f['raw_cv'] * 100:.0f}%"
        )
    print(f"{'peak RSS MiB':<22}{peaks['engine']:>10.0f}{peaks['raw']:>10.0f}")
    print(f"{'load s':<22}{workers['engine'].load_s:>10.2f}{workers['raw'].load_s:>10.2f}")
    verdict = "met" if summary["target_met"] else "NOT met"
    print(f"engine decode overhead: {overhead * 100:+.1f}% (target <= {TARGET_OVERHEAD:.0%}: {verdict}); "
          "ttft in ms; spread = coefficient of variation")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
