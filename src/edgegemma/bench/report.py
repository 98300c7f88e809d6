"""Bench reports: the JSON schema, and the terminal table, Markdown and plot made from them.

A report (schema ``edgegemma.bench/1``) is one run of the harness on one machine::

    {"schema", "created", "target", "host", "device", "settings",
     "runs": [{"backend", "runner", "label", "model", ..., "load_s", "peak_rss_mb",
               "results": [{"workload", "kind", "adapter", "prefill_tps", "decode_tps",
                            "ttft_s", "latency_s", "accuracy", ...}],
               "adapter_swaps": [...], "error"}],
     "overhead", "skipped", "errors"}

Every timing figure is a :class:`~edgegemma.bench.stats.Summary` dict with its samples, so a
reader can recompute anything. ``runner`` is ``engine`` (edgegemma's Engine on a backend),
``raw`` (the raw llama.cpp loop of :mod:`edgegemma.bench.baseline`), ``llama-bench``
(llama.cpp's own tool, locally or on an Android device) or ``llama-completion`` (llama.cpp's
completion tool running task workloads on an Android device). The functions below take a list of
reports so that ``compare`` shows several machines side by side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError
from .stats import NOISY_CV

SCHEMA_ID = "edgegemma.bench/1"

_SUMMARY = {
    "type": ["object", "null"],
    "required": ["n", "mean", "stdev", "min", "max", "p50", "p90", "p99", "cv", "samples"],
    "properties": {
        "n": {"type": "integer", "minimum": 1},
        "samples": {"type": "array", "items": {"type": "number"}},
        **{
            k: {"type": "number"}
            for k in ("mean", "stdev", "min", "max", "p50", "p90", "p99", "cv")
        },
    },
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_RESULT = {
    "type": "object",
    "required": [
        "workload", "kind", "adapter", "requests", "prefill_tps", "decode_tps", "ttft_s",
        "latency_s", "accuracy", "notes",
    ],
    "properties": {
        "workload": {"type": "string"},
        "kind": {"enum": ["pp", "tg", "task"]},
        "adapter": {"type": ["string", "null"]},
        "requests": {"type": "integer", "minimum": 1},
        "prompt_tokens": _NUMBER_OR_NULL,
        "completion_tokens": _NUMBER_OR_NULL,
        "prefill_tps": _SUMMARY,
        "decode_tps": _SUMMARY,
        "ttft_s": _SUMMARY,
        "latency_s": _SUMMARY,
        "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}  # fmt: skip
_SWAP = {
    "type": "object",
    "required": [
        "adapter", "load_s", "swap_first_token_s", "no_swap_cold_first_token_s",
        "no_swap_cached_first_token_s",
    ],
    "properties": {
        "adapter": {"type": "string"},
        "load_s": _SUMMARY,
        "swap_first_token_s": _SUMMARY,
        "no_swap_cold_first_token_s": _SUMMARY,
        "no_swap_cached_first_token_s": _SUMMARY,
    },
}  # fmt: skip
_RUN = {
    "type": "object",
    "required": [
        "backend", "runner", "label", "model", "threads", "load_s", "peak_rss_mb", "results",
        "adapter_swaps", "error",
    ],
    "properties": {
        "backend": {"type": "string"},
        "runner": {"enum": ["engine", "raw", "llama-bench", "llama-completion"]},
        "label": {"type": "string"},
        "model": {"type": "string"},
        "model_size_mb": _NUMBER_OR_NULL,
        "model_description": {"type": "string"},
        "threads": {"type": ["integer", "null"]},
        "load_s": _NUMBER_OR_NULL,
        "peak_rss_mb": _NUMBER_OR_NULL,
        "rss_source": {"type": ["string", "null"]},
        "results": {"type": "array", "items": _RESULT},
        "adapter_swaps": {"type": "array", "items": _SWAP},
        "error": {"type": ["string", "null"]},
    },
}  # fmt: skip
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "edgegemma bench report",
    "type": "object",
    "required": [
        "schema",
        "created",
        "target",
        "host",
        "settings",
        "runs",
        "overhead",
        "skipped",
        "errors",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string"},
        "target": {"type": "string"},
        "host": {
            "type": "object",
            "required": ["hostname", "cpu", "cores", "ram_mb", "os", "libraries"],
            "properties": {
                "libraries": {"type": "object", "additionalProperties": {"type": "string"}}
            },
        },
        "device": {"type": ["object", "null"]},
        "settings": {"type": "object", "required": ["threads", "n_ctx", "repetitions", "warmup"]},
        "runs": {"type": "array", "items": _RUN},
        "overhead": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "backend",
                    "model",
                    "workload",
                    "metric",
                    "engine",
                    "reference",
                    "ratio",
                ],
            },
        },
        "skipped": {
            "type": "array",
            "items": {"type": "object", "required": ["backend", "reason"]},
        },
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}
"""JSON Schema of a report; ``schema`` names its version, bumped on incompatible changes.

``errors`` holds failures of the harness or target that belong to no run (a remote harness
that exited badly); a run that failed has its own ``error`` and keeps what it measured."""


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report written by ``--json``; refuse other files and other schema versions."""
    source = Path(path)
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidParameterError(f"report not found: {source}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"{source} is not a JSON bench report: {exc}") from None
    if not isinstance(report, dict) or "schema" not in report:
        raise InvalidParameterError(f"{source} is not an edgegemma bench report (no schema field)")
    if report["schema"] != SCHEMA_ID:
        raise InvalidParameterError(
            f"{source} has schema {report['schema']!r}; this edgegemma reads {SCHEMA_ID!r}"
        )
    missing = [key for key in SCHEMA["required"] if key not in report]
    if missing:
        raise InvalidParameterError(f"{source} lacks {', '.join(missing)}")
    return report


def failed(report: dict[str, Any]) -> bool:
    """Whether any measurement in the report failed (skipped backends do not count)."""
    return bool(report["errors"]) or any(run["error"] for run in report["runs"])


def engine_overhead(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Engine vs raw loop on the same backend and workload: medians and their ratio."""
    references = {(r["backend"], r["model_path"]): r for r in runs if r["runner"] == "raw"}
    found = []
    for run in runs:
        reference = references.get((run["backend"], run.get("model_path")))
        if run["runner"] != "engine" or reference is None:
            continue
        raw_rows = {row["workload"]: row for row in reference["results"]}
        for row in run["results"]:
            raw = raw_rows.get(row["workload"])
            if row["adapter"] is not None or raw is None:
                continue
            metrics = ("prefill_tps", "ttft_s") if row["kind"] == "pp" else ("decode_tps", "ttft_s")
            for metric in metrics:
                if row[metric] and raw[metric]:
                    engine, ref = row[metric]["p50"], raw[metric]["p50"]
                    found.append({
                        "backend": run["backend"],
                        "model": run["model"],
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


def _sections(reports: Sequence[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the smaller tables below the main one."""
    several = len(reports) > 1
    swaps, overhead, problems = [], [], []
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
        ("Engine overhead: edgegemma Engine vs the raw llama.cpp loop (medians; ratio = engine / raw)",
         head + ["backend", "model", "workload", "metric", "engine vs raw", "ratio", "difference"],
         overhead),
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
        where = (
            f"{host.get('hostname')}: {host.get('cpu')}, {host.get('cores')} cores, "
            f"{(host.get('ram_mb') or 0) / 1024:.1f} GiB RAM, {host.get('os')}"
            + (f"; load average {load[0]:.1f} at start" if load else "")
        )
    return (
        f"{report['target']} -- {where}; threads={settings['threads']} n_ctx={settings['n_ctx']}, "
        f"{settings['repetitions']} repetitions after {settings['warmup']} warm-up"
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
