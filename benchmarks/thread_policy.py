"""Thread policies, idle and with other processes busy: the measurements behind edgegemma's.

    python benchmarks/thread_policy.py [--model gemma3-270m] [--busy 0,1] [--reps 5] [--json out.json]

For each load level (0 = idle, N = N other CPU-bound processes running) and each policy, one
fresh worker process loads the model and measures decode (tg, greedy from random token ids)
and prefill (pp128) through the engine; where a ``llama-bench`` binary is given, it runs too
with the same environment and thread count. The policies:

- ``auto``: edgegemma's default (threads follow the free cores, libgomp's own wait policy);
- ``omp-default N``: N threads, OMP_WAIT_POLICY unset;
- ``passive N`` / ``active N``: N threads under OMP_WAIT_POLICY=PASSIVE / ACTIVE.

Only figures within one run compare; the machine is shared with nothing else while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(model: str, threads: int | None, reps: int, tg: int, pp: int) -> None:
    import edgegemma
    from edgegemma.bench.workloads import Synthetic, synthetic_ids

    engine = edgegemma.load(model, n_threads=threads)
    info = engine.info
    figures: dict[str, list[float]] = {"decode_tps": [], "prefill_tps": []}
    for i in range(reps + 1):
        ids = synthetic_ids(Synthetic("tg", tg), repetition=i, vocab_size=info.vocab_size,
                            bos_id=info.bos_id, ids="random", seed=0)  # fmt: skip
        decode = engine.generate(ids, max_tokens=tg).stats.decode_tps
        ids = synthetic_ids(Synthetic("pp", pp), repetition=i, vocab_size=info.vocab_size,
                            bos_id=info.bos_id, ids="random", seed=0)  # fmt: skip
        prefill = engine.generate(ids, max_tokens=1).stats.prefill_tps
        if i:  # the first round warms up
            figures["decode_tps"].append(decode)
            figures["prefill_tps"].append(prefill)
    print(json.dumps({k: statistics.median(v) for k, v in figures.items()}))


def run_worker(
    model: str, env: dict[str, str], threads: int | None, args: argparse.Namespace
) -> dict:
    command = [sys.executable, __file__, "--worker", "--model", model, "--reps", str(args.reps),
               "--tg", str(args.tg), "--pp", str(args.pp)]  # fmt: skip
    if threads:
        command += ["--threads", str(threads)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_llama_bench(
    binary: str, model: str, env: dict[str, str], threads: int, args: argparse.Namespace
) -> dict:
    figures = {}
    for key, flags in (("decode_tps", ["-p", "0", "-n", str(args.tg)]),
                       ("prefill_tps", ["-p", str(args.pp), "-n", "0"])):  # fmt: skip
        out = subprocess.run(
            [binary, "-m", model, "-t", str(threads), "-r", str(args.reps), "-o", "json", *flags],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        figures[key] = json.loads(out[out.find("[") :])[0]["avg_ts"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m-embed-iq4_nl")
    parser.add_argument("--busy", default="0,1", help="numbers of busy processes (default 0,1)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llama-bench", help="also run this llama-bench binary")
    parser.add_argument("--policies", help="comma-separated subset of the policies")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.threads, args.reps, args.tg, args.pp)
        return 0

    from edgegemma import models
    from edgegemma.threads import default_threads

    model = str(models.resolve(args.model))
    cores = default_threads()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    policies: dict[str, tuple[dict[str, str], int | None]] = {"auto": (base, None)}
    for n in sorted({cores, max(1, cores - 1)}, reverse=True):
        policies[f"omp-default {n}"] = (base, n)
    policies[f"passive {cores}"] = ({**base, "OMP_WAIT_POLICY": "PASSIVE"}, cores)
    policies[f"active {cores}"] = ({**base, "OMP_WAIT_POLICY": "ACTIVE"}, cores)
    if args.policies:
        wanted = args.policies.split(",")
        policies = {k: v for k, v in policies.items() if k in wanted or k.split()[0] in wanted}
    rows = []
    for busy in (int(b) for b in args.busy.split(",")):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            for name, (env, threads) in policies.items():
                row = {"busy": busy, "policy": name, "runner": "engine",
                       **run_worker(model, env, threads, args)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.llama_bench and threads:
                    row = {"busy": busy, "policy": name, "runner": "llama-bench",
                           **run_llama_bench(args.llama_bench, model, env, threads, args)}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    print(f"\n{args.model}, {cores} cores, tg{args.tg} / pp{args.pp}, median of {args.reps}")
    print(
        "| busy processes | policy | runner | decode tok/s | prefill tok/s |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['busy']} | {r['policy']} | {r['runner']} | {r['decode_tps']:.1f} | {r['prefill_tps']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": args.model, "cores": cores, "rows": rows}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
