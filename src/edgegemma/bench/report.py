"""Bench reports as people read them: the terminal table, Markdown and a plot.

What a report holds is :mod:`edgegemma.bench.schema`. The functions below take a list of
reports so that ``compare`` shows several machines side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .schema import REFERENCE_RUNNERS, SCHEMA_ID
from .stats import NOISY_CV


def failed(report: dict[str, Any]) -> bool:
    """Whether any measurement in the report failed (skipped backends do not count)."""
    return bool(report["errors"]) or any(run["error"] for run in report["runs"])


def engine_overhead(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine against each reference on the same backend, model and workload: medians and
    their ratio. References: the runtime alone (``raw``), llama-cpp-python's own API and
    ``llama-bench``."""
    references = [r for r in runs if r["runner"] in REFERENCE_RUNNERS and not r["error"]]
    found = []
    for run in runs:
        if run["runner"] != "engine":
            continue
        for reference in references:
            same = (reference["backend"], reference.get("model_path"))
            if same != (run["backend"], run.get("model_path")):
                continue
            ref_rows = {row["workload"]: row for row in reference["results"]}
            for row in run["results"]:
                ref_row = ref_rows.get(row["workload"])
                if row["adapter"] is not None or ref_row is None:
                    continue
                metrics = (
                    ("prefill_tps", "ttft_s") if row["kind"] == "pp" else ("decode_tps", "ttft_s")
                )
                for metric in metrics:
                    if row[metric] and ref_row[metric]:
                        engine, ref = row[metric]["p50"], ref_row[metric]["p50"]
                        found.append({
                            "backend": run["backend"],
                            "model": run["model"],
                            "reference_runner": reference["runner"],
                            "workload": row["workload"],
                            "metric": metric,
                            "engine": engine,
                            "reference": ref,
                            "ratio": engine / ref if ref else None,
                        })  # fmt: skip
    return found


# -- the table -------------------------------------------------------------------------

_COLUMNS = (
    "backend", "model", "adapter", "workload", "prefill tok/s", "decode tok/s", "TTFT ms p50",
    "latency ms p50/p90/p99", "accuracy", "peak RSS MiB", "load s",
)  # fmt: skip


def device_label(report: dict[str, Any]) -> str:
    device = report.get("device") or {}
    if device.get("model"):
        return str(device["model"])
    return str(report["host"].get("hostname", "?"))


def _rate(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    noisy = summary["n"] > 1 and summary["cv"] > NOISY_CV
    return f"{summary['mean']:.1f} ±{summary['cv'] * 100:.0f}%{'!' if noisy else ''}"


def _ms(summary: dict[str, Any] | None, *keys: str) -> str:
    if not summary:
        return "-"
    text = "/".join(
        f"{summary[k] * 1000:.0f}" if summary[k] >= 0.01 else f"{summary[k] * 1000:.1f}"
        for k in keys
    )
    noisy = summary["n"] > 1 and summary["cv"] > NOISY_CV
    return text + ("!" if noisy else "")


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rows(reports: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (a device column when there are several)."""
    several = len(reports) > 1
    header = (["device"] if several else []) + list(_COLUMNS)
    body = []
    for report in reports:
        for run in report["runs"]:
            for row in run["results"]:
                accuracy = row["accuracy"]
                cells = [
                    run["label"],
                    run["model"],
                    row["adapter"] or "-",
                    row["workload"],
                    _rate(row["prefill_tps"]),
                    _rate(row["decode_tps"]),
                    _ms(row["ttft_s"], "p50"),
                    _ms(row["latency_s"], "p50", "p90", "p99"),
                    "-"
                    if accuracy is None
                    else f"{accuracy * 100:.0f}% ({row.get('correct', '?')}/{row['requests']})",
                    _number(run["peak_rss_mb"], ".0f"),
                    _number(run["load_s"], ".2f"),
                ]
                body.append(([device_label(report)] if several else []) + cells)
    return header, body


_REFERENCE_NAMES = {
    "raw": "runtime alone",
    "llama-cpp-python": "llama-cpp-python Llama API",
    "llama-bench": "llama-bench",
}


def _sections(reports: Sequence[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the smaller tables below the main one."""
    several = len(reports) > 1
    swaps, overhead, serving, problems = [], [], [], []
    for report in reports:
        prefix = [device_label(report)] if several else []
        for run in report["runs"]:
            for swap in run["adapter_swaps"]:
                swaps.append(prefix + [
                    run["label"],
                    swap["adapter"],
                    _ms(swap["load_s"], "p50"),
                    _ms(swap["swap_first_token_s"], "p50"),
                    _ms(swap["no_swap_cold_first_token_s"], "p50"),
                    _ms(swap["no_swap_cached_first_token_s"], "p50"),
                ])  # fmt: skip
            if run["error"]:
                problems.append(prefix + [run["label"], f"error: {run['error']}"])
            for row in run["results"]:
                if "overhead_s" in row:
                    serving.append(prefix + [
                        run["backend"],
                        row["workload"],
                        _ms(row["engine_latency_s"], "p50"),
                        _ms(row["latency_s"], "p50"),
                        f"{row['overhead_s']['p50'] * 1000:+.1f}",
                    ])  # fmt: skip
                    continue
                workload = row["workload"] + (f" +{row['adapter']}" if row["adapter"] else "")
                for note in row["notes"]:
                    problems.append(prefix + [run["label"], f"{workload}: {note}"])
        for item in report["overhead"]:
            metric = {
                "prefill_tps": "prefill tok/s",
                "decode_tps": "decode tok/s",
                "ttft_s": "TTFT",
            }[item["metric"]]
            engine, ref = item["engine"], item["reference"]
            if item["metric"] == "ttft_s":
                values = f"{engine * 1000:.1f} ms vs {ref * 1000:.1f} ms"
                verdict = f"{(item['ratio'] - 1) * 100:+.1f}% time"
            else:
                values = f"{engine:.1f} vs {ref:.1f}"
                verdict = f"{(item['ratio'] - 1) * 100:+.1f}% speed"
            overhead.append(
                prefix
                + [
                    item["backend"],
                    _REFERENCE_NAMES.get(item.get("reference_runner", "raw"), "?"),
                    item["model"],
                    item["workload"],
                    metric,
                    values,
                    f"{item['ratio']:.3f}",
                    verdict,
                ]
            )
        for skipped in report["skipped"]:
            problems.append(prefix + [skipped["backend"], f"skipped: {skipped['reason']}"])
        for error in report["errors"]:
            problems.append(prefix + ["harness", f"error: {error}"])
    head = ["device"] if several else []
    return [
        ("Adapter swap (ms, p50): first token after a swap vs the same adapter without one",
         head + ["backend", "adapter", "load", "swap+1st token", "no swap, cold KV", "no swap, cached KV"], swaps),
        ("Engine vs the runtime alone and the peers (medians; ratio = engine / reference)",
         head + ["backend", "reference", "model", "workload", "metric", "engine vs reference",
                 "ratio", "difference"],
         overhead),
        ("edgegemma serve vs the in-process engine (ms per request, p50 of paired requests)",
         head + ["backend", "workload", "engine", "server", "added"], serving),
        ("Notes", head + ["what", "note"], [list(p) for p in dict.fromkeys(map(tuple, problems))]),
    ]  # fmt: skip


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
        for line in [header, *body]
    ]


def _describe(report: dict[str, Any]) -> str:
    host, settings = report["host"], report["settings"]
    device = report.get("device")
    if device:
        where = (
            f"{device.get('model')} ({device.get('soc')}, Android {device.get('android')}, "
            f"{device.get('cores')} cores)"
        )
    else:
        load = host.get("load_average")
        board = f" ({host['board']})" if host.get("board") else ""
        where = (
            f"{host.get('hostname')}{board}: {host.get('cpu')}, {host.get('cores')} cores, "
            f"{(host.get('ram_mb') or 0) / 1024:.1f} GiB RAM, {host.get('os')}"
            + (f"; load average {load[0]:.1f} at start" if load else "")
        )
    emulated = (device or host).get("emulated")
    return (
        f"{report['target']} -- {where}; threads={settings['threads']} n_ctx={settings['n_ctx']}, "
        f"{settings['repetitions']} repetitions after {settings['warmup']} warm-up"
        + (f"; EMULATED ({emulated}): timings are not this device's speed" if emulated else "")
    )


def format_table(reports: Sequence[dict[str, Any]]) -> str:
    """The terminal table: results, adapter swaps, engine overhead, notes."""
    lines = [f"edgegemma bench {SCHEMA_ID}"]
    lines += [f"  {_describe(report)}" for report in reports]
    header, body = rows(reports)
    lines += ["", *_aligned(header, body)] if body else ["", "no results"]
    for title, sub_header, sub_body in _sections(reports):
        if sub_body:
            lines += ["", title, *_aligned(sub_header, sub_body)]
    lines += [
        "",
        (
            f"tok/s: mean ±coefficient of variation over repetitions; '!' marks a spread over "
            f"{NOISY_CV:.0%} (a noisy figure). Latency: whole request, p50/p90/p99."
        ),
    ]
    return "\n".join(lines) + "\n"


def format_markdown(reports: Sequence[dict[str, Any]]) -> str:
    def table(header: list[str], body: list[list[str]]) -> list[str]:
        cells = [[str(c).replace("|", "\\|") for c in line] for line in body]
        return [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(line) + " |" for line in cells),
        ]

    lines = ["# edgegemma bench", ""]
    lines += [f"- {_describe(report)}" for report in reports]
    header, body = rows(reports)
    lines += ["", *table(header, body)]
    for title, sub_header, sub_body in _sections(reports):
        if sub_body:
            lines += ["", f"**{title}**", "", *table(sub_header, sub_body)]
    lines += [
        "",
        (
            f"tok/s: mean ±coefficient of variation; `!` marks a spread over {NOISY_CV:.0%}. "
            "Latency: whole request, p50/p90/p99 in ms."
        ),
    ]
    return "\n".join(lines) + "\n"


# -- the plot --------------------------------------------------------------------------


def plot(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Bars of prefill and decode tok/s (± stdev) and boxes of request latency per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    several = len(reports) > 1
    rates: dict[str, list[tuple[str, float, float]]] = {"prefill_tps": [], "decode_tps": []}
    latencies: list[tuple[str, list[float]]] = []
    for report in reports:
        device = f"{device_label(report)}: " if several else ""
        for run in report["runs"]:
            for row in run["results"]:
                name = f"{device}{run['label']}{' +' + row['adapter'] if row['adapter'] else ''} {row['workload']}"
                for metric, found in rates.items():
                    if row[metric]:
                        found.append((name, row[metric]["mean"], row[metric]["stdev"]))
                if row["latency_s"]:
                    latencies.append((name, [s * 1000 for s in row["latency_s"]["samples"]]))
    panels = [(m, v) for m, v in rates.items() if v]
    counts = [len(v) for _, v in panels] + [len(latencies)]
    figure, axes = plt.subplots(
        len(counts), 1, figsize=(10, sum(0.3 * n + 1.2 for n in counts) + 0.6),
        height_ratios=[0.3 * n + 1.2 for n in counts], squeeze=False,
    )  # fmt: skip
    titles = {
        "prefill_tps": "prefill tok/s (mean ± stdev)",
        "decode_tps": "decode tok/s (mean ± stdev)",
    }
    for (axis,), (metric, values) in zip(axes, panels):
        axis.barh(
            [v[0] for v in values],
            [v[1] for v in values],
            xerr=[v[2] for v in values],
            color="#4c72b0",
            capsize=3,
        )
        axis.set_title(titles[metric], fontsize=10)
        axis.invert_yaxis()
        axis.grid(axis="x", alpha=0.3)
    axis = axes[-1][0]
    if latencies:
        axis.boxplot(
            [v for _, v in latencies],
            orientation="horizontal",
            tick_labels=[n for n, _ in latencies],
        )
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.invert_yaxis()
    axis.set_title(
        "request latency, ms (log scale; box: quartiles, whiskers: 1.5 IQR)", fontsize=10
    )
    axis.grid(axis="x", alpha=0.3)
    figure.suptitle("\n".join(_describe(r) for r in reports), fontsize=8)
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
