"""The bench's statistics, workloads, report schema and compare: no model needed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgegemma import skills
from edgegemma.bench import cli, schema
from edgegemma.bench.stats import percentile, summarize
from edgegemma.bench.targets import BenchRequest, split_model_specs, ssh_command
from edgegemma.bench.workloads import (
    Synthetic,
    is_correct,
    load_task,
    normalize_label,
    parse_sizes,
    shipped_tasks,
    synthetic_ids,
)
from edgegemma.errors import InvalidParameterError
from edgegemma.skills import sensor

REPO = Path(__file__).resolve().parents[1]
SAMPLES = [
    [3.0],
    [1.0, 2.0],
    [5.0, 1.0, 4.0, 2.0, 3.0],
    [0.1, 0.1, 0.1, 9.0],
    list(np.random.default_rng(7).lognormal(0.0, 1.0, 101)),
    list(np.random.default_rng(8).normal(50.0, 5.0, 37)),
]


@pytest.mark.parametrize("samples", SAMPLES)
def test_percentiles_match_numpy(samples):
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(samples, q) == pytest.approx(
            np.percentile(samples, q), rel=1e-12, abs=1e-12
        )


@pytest.mark.parametrize("samples", SAMPLES)
def test_summary_matches_numpy(samples):
    s = summarize(samples)
    values = np.asarray(samples)
    assert s.n == len(samples)
    assert s.mean == pytest.approx(values.mean())
    assert s.stdev == pytest.approx(values.std(ddof=1) if len(samples) > 1 else 0.0)
    assert (s.min, s.max) == (values.min(), values.max())
    assert (s.p50, s.p90, s.p99) == pytest.approx(tuple(np.percentile(values, [50, 90, 99])))
    assert s.min <= s.p50 <= s.p90 <= s.p99 <= s.max
    assert s.cv == pytest.approx(s.stdev / s.mean)
    assert list(s.samples) == [float(v) for v in samples]


def test_spread_flags_noisy_runs():
    assert not summarize([100.0, 101.0, 99.0]).noisy
    assert summarize([100.0, 150.0, 60.0]).noisy
    assert not summarize([100.0]).noisy


def test_summary_round_trips_through_json():
    s = summarize([1.0, 2.0, 4.0])
    assert type(s).from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_bad_samples_are_refused():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# -- workloads -------------------------------------------------------------------------


def test_shipped_sensor_task_loads():
    assert "sensor" in shipped_tasks()
    task = load_task("sensor")
    assert len(task.examples) >= 30
    labels = {e.expected for e in task.examples}
    assert labels == {"normal", "warning", "critical"}
    assert all(e.prompt.endswith("Status:") and e.stop == ("\n",) for e in task.examples)
    assert len(load_task("sensor", limit=3).examples) == 3


def test_shipped_sensor_task_is_the_skills_held_out_split():
    """Labels from the skill's rule; the base model's few-shot prompt; the adapter's own prompt."""
    test_inputs = {e.input for e in skills.examples("sensor", "test")}
    for row in map(json.loads, (REPO / "src/edgegemma/data/workloads/sensor.jsonl").open()):
        assert row["input"] in test_inputs
        assert row["expected"] == sensor.label(row["input"])
        assert row["prompt"] == skills.few_shot_prompt("sensor", row["input"])
        assert row["adapter_prompt"] == skills.prompt("sensor", row["input"])
    example = load_task("sensor").examples[0]
    assert example.prompt_for("sensor") == example.adapter_prompt
    assert example.prompt_for(None) == example.prompt


def test_task_files_are_checked(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"prompt": "Q: 2+2\\nA:", "expected": "4", "max_tokens": 2, "stop": ["."]}\n\n'
    )
    task = load_task(str(good))
    assert (
        task.name == "good" and task.examples[0].max_tokens == 2 and task.examples[0].stop == (".",)
    )
    training = tmp_path / "train.jsonl"
    training.write_text(
        '{"input": "x", "prompt": "Reading: x\\nStatus:", "completion": " normal"}\n'
    )
    assert load_task(str(training)).examples[0].expected == " normal"
    for text, message in [
        ("not json\n", "not valid JSON"),
        ('{"prompt": "x"}\n', '"prompt" and "expected"'),
        ('{"prompt": "x", "expected": "y", "max_tokens": 0}\n', "max_tokens"),
        ('{"prompt": "x", "expected": "y", "stop": "\\n"}\n', "stop"),
        ("\n", "no examples"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(InvalidParameterError, match=message):
            load_task(str(bad))
    with pytest.raises(InvalidParameterError, match="not found"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InvalidParameterError, match="sensor"):
        load_task("no-such-task")


def test_labels_are_normalized():
    assert normalize_label(" Warning.\n") == "warning"
    assert normalize_label("**critical** because") == "critical"
    assert normalize_label("") == ""
    assert is_correct(" normal", "normal") and not is_correct(" normally", "normal")


def test_synthetic_ids():
    pp = Synthetic("pp", 64)
    first = synthetic_ids(pp, repetition=0, vocab_size=1000, bos_id=2, ids="random", seed=0)
    assert len(first) == 64 and first[0] == 2 and all(0 <= t < 1000 for t in first)
    assert first == synthetic_ids(pp, repetition=0, vocab_size=1000, bos_id=2, ids="random", seed=0)
    assert first != synthetic_ids(pp, repetition=1, vocab_size=1000, bos_id=2, ids="random", seed=0)
    fixed = [
        synthetic_ids(pp, repetition=r, vocab_size=1000, bos_id=None, ids="fixed", seed=0)
        for r in (0, 1)
    ]
    assert fixed[0] == fixed[1] and len(fixed[0]) == 64
    tg = Synthetic("tg", 32)
    assert synthetic_ids(tg, repetition=3, vocab_size=1000, bos_id=2, ids="random", seed=0) == [2]
    assert (tg.max_tokens, pp.max_tokens, tg.name) == (32, 1, "tg32")


def test_sizes_and_requests():
    assert parse_sizes("128,512", "-p") == [128, 512]
    assert parse_sizes("0", "-p") == []
    with pytest.raises(InvalidParameterError):
        parse_sizes("12x", "-p")
    request = cli.request_from(
        cli.run_parser().parse_args([
            "-p", "16,32", "-n", "0", "--task", "none", "-t", "3", "--adapter", "a=/x/a.gguf",
            "--adapter", "llamacpp:a=/x/a-llama.gguf", "--adapter", "c=/x/c:d.gguf",
        ])
    )  # fmt: skip
    assert request.synthetic == [Synthetic("pp", 16), Synthetic("pp", 32)]
    assert request.tasks == ()
    assert request.adapters_for("llamacpp") == {"a": "/x/a-llama.gguf", "c": "/x/c:d.gguf"}
    assert request.adapters_for("onnx") == {"a": "/x/a.gguf", "c": "/x/c:d.gguf"}
    # The ssh target sends the same request to the remote harness.
    again = cli.request_from(cli.run_parser().parse_args(request.to_argv()))
    assert again == request
    for wrong in ("nopath", "c:d=/x/d.gguf", "a=/x/a.gguf:0.5"):
        with pytest.raises(InvalidParameterError, match="NAME=PATH"):
            cli.request_from(cli.run_parser().parse_args(["--adapter", wrong]))
    skill = cli.request_from(cli.run_parser().parse_args(["--adapter", "sensor"]))
    assert skill.adapters_for("llamacpp") == {"sensor": str(skills.adapter_path("sensor"))}
    assert cli.request_from(cli.run_parser().parse_args(skill.to_argv())) == skill


def test_model_specs_split_by_backend():
    per_backend, general = split_model_specs(
        ["llamacpp=/m/a.gguf", "gemma3-270m", "/odd=name.gguf"], ["llamacpp", "onnx"]
    )
    assert per_backend == {"llamacpp": ["/m/a.gguf"]}
    assert general == ["gemma3-270m", "/odd=name.gguf"]


def test_ssh_command_quotes_the_remote_harness():
    args = ssh_command(
        "ssh://pi@raspberrypi.local:2222", BenchRequest(models=("/home/pi/my model.gguf",)),
        remote_python="/home/pi/.venv/bin/python", options=["IdentityFile=/k"],
    )  # fmt: skip
    assert args[:7] == ["ssh", "-o", "BatchMode=yes", "-o", "IdentityFile=/k", "-p", "2222"]
    assert args[7:9] == ["pi@raspberrypi.local", "--"]
    assert args[9].startswith("/home/pi/.venv/bin/python -m edgegemma.bench ")
    assert "'/home/pi/my model.gguf'" in args[9] and args[9].endswith("--json -")
    with pytest.raises(InvalidParameterError):
        ssh_command("ssh://", BenchRequest(), remote_python="python3", options=[])


# -- reports ---------------------------------------------------------------------------


def _report(hostname: str, decode: list[float], latency: list[float]) -> dict:
    """A schema-valid report around the given samples (as measured elsewhere)."""
    row = {
        "workload": "tg32", "kind": "tg", "adapter": None, "requests": len(decode),
        "prompt_tokens": 1, "completion_tokens": 32, "prefill_tps": None,
        "decode_tps": summarize(decode).to_dict(), "ttft_s": summarize([0.05] * len(decode)).to_dict(),
        "latency_s": summarize(latency).to_dict(), "accuracy": None, "notes": [],
    }  # fmt: skip
    run = {
        "backend": "llamacpp", "runner": "engine", "label": "llamacpp", "model": "m.gguf",
        "model_size_mb": 241.0, "threads": 4, "load_s": 0.5, "peak_rss_mb": 400.0,
        "rss_source": "VmHWM", "results": [row], "adapter_swaps": [], "error": None,
    }  # fmt: skip
    return {
        "schema": schema.SCHEMA_ID, "created": "2026-11-21T00:00:00+00:00", "target": "local",
        "host": {"hostname": hostname, "cpu": "cpu", "cores": 4, "ram_mb": 8192.0, "os": "Linux",
                 "libraries": {"edgegemma": "0.1.0"}},
        "device": None,
        "settings": {"threads": 4, "n_ctx": 2048, "repetitions": len(decode), "warmup": 1},
        "runs": [run], "overhead": [], "skipped": [], "errors": [],
    }  # fmt: skip


def test_schema_is_versioned_and_checks_reports():
    assert schema.SCHEMA_ID == "edgegemma.bench/1"
    good = _report("laptop", [50.0, 52.0], [0.7, 0.71])
    jsonschema.validate(good, schema.SCHEMA)
    broken = json.loads(json.dumps(good))
    del broken["runs"][0]["results"][0]["latency_s"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema.SCHEMA)
    wrong_version = dict(good, schema="edgegemma.bench/0")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong_version, schema.SCHEMA)


def test_committed_example_report_matches_the_schema():
    examples = sorted((REPO / "benchmarks/results").glob("example-*.json"))
    assert examples, "benchmarks/results/ must hold an example report"
    for path in examples:
        jsonschema.validate(schema.load_report(path), schema.SCHEMA)


def test_compare_merges_reports_from_several_hosts(tmp_path, capsys):
    paths = []
    for host, decode in (("laptop", [50.0, 52.0, 51.0]), ("raspberrypi", [12.0, 12.5, 11.0])):
        path = tmp_path / f"{host}.json"
        path.write_text(json.dumps(_report(host, decode, [0.6, 0.65, 0.7])))
        paths.append(str(path))
    merged, plot, markdown = tmp_path / "all.json", tmp_path / "all.png", tmp_path / "all.md"
    code = cli.main(
        ["compare", *paths, "--json", str(merged), "--plot", str(plot), "--markdown", str(markdown)]
    )
    assert code == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if "tg32" in line]
    assert [line.split()[0] for line in lines] == ["laptop", "raspberrypi"]
    assert "51.0" in lines[0] and "11.8" in lines[1]
    document = json.loads(merged.read_text())
    assert document["schema"] == "edgegemma.bench.compare/1"
    assert [r["host"]["hostname"] for r in document["reports"]] == ["laptop", "raspberrypi"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| device |" in markdown.read_text()


def test_compare_refuses_what_is_not_a_report(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert cli.main(["compare", str(other)]) == 2
    assert "not an edgegemma bench report" in capsys.readouterr().err
    old = tmp_path / "old.json"
    old.write_text(json.dumps(dict(_report("x", [1.0], [1.0]), schema="edgegemma.bench/0")))
    assert cli.main(["compare", str(old)]) == 2
    assert "edgegemma.bench/1" in capsys.readouterr().err


def test_unknown_target_and_backend_are_clear(capsys):
    assert cli.main(["--target", "telnet://x"]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert cli.main(["--backend", "nope", "--task", "none"]) == 2
    assert "unknown backend nope" in capsys.readouterr().err
