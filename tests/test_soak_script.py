"""benchmarks/soak.py still runs: a few swaps on llama.cpp (the full soak is not a test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "soak.py"


def test_soak_script_runs_and_reports(capsys):
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    argv = ["--swaps", "12", "--warmup", "4", "--max-tokens", "2", "--reload-every", "5", "--json"]
    assert soak.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["swaps"] == 12 and report["reloads"] == 2
    assert report["drifted"] == [] and report["probes"] == len(soak.STATES)
    assert 100 < report["rss_after_warmup_mb"] and abs(report["rss_growth_mb"]) < 100
