"""A short real bench run on the embedded model, for every installed backend."""

from __future__ import annotations

import json

import jsonschema
import pytest
from loras import random_lora

from edgegemma import models
from edgegemma.backends import available_backends, get_backend
from edgegemma.bench import cli, report, schema
from edgegemma.bench.targets import models_for
from edgegemma.errors import BackendUnavailableError, ModelError


def _installed() -> list[str]:
    found = []
    for name in available_backends():
        try:
            get_backend(name)
        except BackendUnavailableError:
            continue
        found.append(name)
    return found


def _check_summary(summary: dict, *, positive: bool = True) -> None:
    assert summary["n"] >= 1
    assert summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
    if positive:
        assert summary["min"] > 0


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory, gguf_path, base_header):
    folder = tmp_path_factory.mktemp("bench")
    adapter = random_lora(folder / "a.gguf", base_header, seed=1, std=0.03)
    out = folder / "report.json"
    argv = [
        "-p", "16", "-n", "8", "-r", "2", "--warmup", "1", "--task", "sensor", "--task-limit", "3",
        "-t", "2", "--n-ctx", "1024", "--model", f"llamacpp={gguf_path}", "--adapter", f"llamacpp:a={adapter}",
        "--json", str(out), "--markdown", str(folder / "report.md"), "--plot", str(folder / "report.png"),
    ]  # fmt: skip
    code = cli.main(argv)
    return code, json.loads(out.read_text()), folder


def test_run_passes_and_matches_the_schema(bench_report, capsys):
    code, found, folder = bench_report
    assert code == 0, found["errors"] or [r["error"] for r in found["runs"]]
    jsonschema.validate(found, schema.SCHEMA)
    assert found["target"] == "local"
    host = found["host"]
    assert (
        host["cores"] >= 1
        and host["ram_mb"] > 0
        and host["cpu"]
        and "llama-cpp-python" in host["libraries"]
    )
    assert found["settings"]["threads"] == 2
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| backend |" in (folder / "report.md").read_text()


def test_every_installed_backend_is_measured(bench_report):
    """Each installed backend is measured, or skipped because it cannot open the default model
    (an ONNX backend without a converted build, say); the others are skipped as not installed."""
    _, found, _ = bench_report
    measured = {run["backend"] for run in found["runs"] if run["runner"] == "engine"}
    skipped = {s["backend"]: s["reason"] for s in found["skipped"]}
    installed = set(_installed())
    assert "llamacpp" in measured and measured <= installed
    for backend in installed - measured:  # with a cold cache: no ONNX or LiteRT-LM build yet
        reason = skipped[backend]
        assert reason.startswith("cannot open gemma-3-270m") and "no " in reason, reason
        assert reason.endswith(f"pass --model {backend}=PATH")
    for backend in set(available_backends()) - installed:
        assert "not installed" in skipped[backend]


def test_engine_metrics_are_plausible(bench_report):
    _, found, _ = bench_report
    for run in (r for r in found["runs"] if r["runner"] == "engine"):
        assert run["error"] is None
        assert run["load_s"] > 0
        assert run["rss_source"] in ("VmHWM", "ru_maxrss")
        assert run["peak_rss_mb"] > run["model_size_mb"] > 0
        rows = {(row["workload"], row["adapter"]): row for row in run["results"]}
        # The adapter was given to llamacpp only (as llamacpp:a=...).
        adapters = (None, "a") if run["backend"] == "llamacpp" else (None,)
        workloads = ("pp16", "tg8", "sensor", "sensor (classify)")
        assert set(rows) == {(w, a) for w in workloads for a in adapters}
        for (workload, adapter), row in rows.items():
            _check_summary(row["ttft_s"])
            _check_summary(row["latency_s"])
            if workload == "pp16":
                assert row["requests"] == 2 and row["prompt_tokens"] == 16
                _check_summary(row["prefill_tps"])
                assert row["decode_tps"] is None
            elif workload == "tg8":
                assert row["requests"] == 2
                _check_summary(row["decode_tps"])
                assert row["prefill_tps"] is None
            else:
                assert row["requests"] == 3 and 0 <= row["accuracy"] <= 1
                assert row["correct"] == round(row["accuracy"] * 3)
                if workload == "sensor (classify)":
                    assert row["batch_requests_per_s"] > 0
                # The few-shot prefix is reused where that is exact: llama.cpp, no adapter.
                elif adapter is None and run["backend"] == "llamacpp":
                    assert row["cached_tokens"] > 0
        if run["backend"] != "llamacpp":
            assert run["adapter_swaps"] == []
            continue
        (swap,) = run["adapter_swaps"]
        assert swap["adapter"] == "a"
        for key in (
            "load_s",
            "swap_first_token_s",
            "no_swap_cold_first_token_s",
            "no_swap_cached_first_token_s",
        ):
            _check_summary(swap[key])
            assert swap[key]["n"] == 2
        # Timings on a shared machine: no order between the columns is asserted.
        assert swap["no_swap_cached_first_token_s"]["n"] == swap["swap_first_token_s"]["n"]


@pytest.mark.parametrize("runner", ["raw", "llama-cpp-python"])
def test_reference_runs_and_overhead(bench_report, runner):
    _, found, _ = bench_report
    (raw,) = [r for r in found["runs"] if r["runner"] == runner and r["backend"] == "llamacpp"]
    assert raw["backend"] == "llamacpp" and raw["error"] is None
    assert raw["peak_rss_mb"] > raw["model_size_mb"]
    assert [row["workload"] for row in raw["results"]] == ["pp16", "tg8"]
    _check_summary(raw["results"][0]["prefill_tps"])
    _check_summary(raw["results"][1]["decode_tps"])
    overhead = {
        (o["workload"], o["metric"]): o
        for o in found["overhead"]
        if o["reference_runner"] == runner and o["backend"] == "llamacpp"
    }
    assert set(overhead) == {
        ("pp16", "prefill_tps"),
        ("pp16", "ttft_s"),
        ("tg8", "decode_tps"),
        ("tg8", "ttft_s"),
    }
    for item in overhead.values():
        assert item["ratio"] == pytest.approx(item["engine"] / item["reference"])
        assert item["ratio"] > 0  # (no timing bounds: this machine is shared)


def test_table_shows_everything(bench_report):
    _, found, _ = bench_report
    table = report.format_table([found])
    for text in (
        "llamacpp (runtime alone)",
        "llama-cpp-python Llama API",
        "sensor",
        "Engine vs the runtime alone",
        "Adapter swap",
        "pp16",
        "tg8",
    ):
        assert text in table


def test_models_are_chosen_per_backend(gguf_path, tmp_path):
    known = ["llamacpp", "onnx"]
    default = models.resolve(models.default_model("llamacpp"))
    assert models_for("llamacpp", [], known) == ([default], True)
    assert models_for("onnx", [], known) == ([gguf_path], True)  # its builds come from the pin
    other = tmp_path / "other.gguf"
    other.write_bytes(b"")
    specs = [f"llamacpp={gguf_path}", str(other)]
    assert models_for("llamacpp", specs, known) == ([gguf_path], False)
    assert models_for("onnx", specs, known) == ([other], False)
    with pytest.raises(ModelError, match="neither a model name"):
        models_for("onnx", ["no-such-model"], known)
