"""The bench report's JSON schema, and reading reports back.

A report (schema ``edgegemma.bench/1``) is one run of the harness on one machine::

    {"schema", "created", "target", "host", "device", "settings",
     "runs": [{"backend", "runner", "label", "model", ..., "load_s", "peak_rss_mb",
               "results": [{"workload", "kind", "adapter", "prefill_tps", "decode_tps",
                            "ttft_s", "latency_s", "accuracy", ...}],
               "adapter_swaps": [...], "error"}],
     "overhead", "skipped", "errors"}

Every timing figure is a :class:`~edgegemma.bench.stats.Summary` dict with its samples, so a
reader can recompute anything. ``host`` (and ``device`` for adb) say where it ran, including
``board`` (``/proc/device-tree/model``) and ``emulated``: why the timings are not the
machine's own (an arm64 Python or arm64 tools run by an emulator), or null. ``runner`` is ``engine`` (edgegemma's Engine on a backend),
``raw`` (the backend's runtime driven alone, :mod:`edgegemma.bench.baseline`),
``llama-cpp-python`` (llama-cpp-python's high-level API), ``llama-bench`` (llama.cpp's own
tool, locally or on an Android device), ``llama-completion`` (llama.cpp's completion tool
running task workloads on an Android device) or ``server`` (``edgegemma serve`` on localhost;
its rows add ``engine_latency_s`` and ``overhead_s``, the paired in-process figures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError

SCHEMA_ID = "edgegemma.bench/1"
REFERENCE_RUNNERS = ("raw", "llama-cpp-python", "llama-bench")
"""Runners the engine is compared with (:func:`edgegemma.bench.report.engine_overhead`)."""

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
        "runner": {"enum": ["engine", *REFERENCE_RUNNERS, "llama-completion", "server"]},
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
    if source.exists() and not source.is_file():
        raise InvalidParameterError(f"{source} is not a file; give a report written by --json")
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidParameterError(f"report not found: {source}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"{source} is not a JSON bench report: {exc}") from None
    except OSError as exc:
        raise InvalidParameterError(f"cannot read {source}: {exc.strerror}") from None
    if not isinstance(report, dict) or "schema" not in report:
        raise InvalidParameterError(f"{source} is not an edgegemma bench report (no schema field)")
    if report["schema"] != SCHEMA_ID:
        raise InvalidParameterError(
            f"{source} has schema {report['schema']!r}; this edgegemma reads {SCHEMA_ID!r}"
        )
    try:
        import jsonschema
    except ImportError:
        raise InvalidParameterError(
            "reading reports needs jsonschema: pip install 'edgegemma[bench]'"
        ) from None
    problem = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(SCHEMA).iter_errors(report)
    )
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path) or "the top level"
        raise InvalidParameterError(
            f"{source} is not a valid bench report: at {where}: {problem.message}"
        )
    return report
