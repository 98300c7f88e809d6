"""LoRA training on the CPU, end to end but tiny: a few steps on a few sensor examples.

The shipped skills are trained by ``python -m edgegemma.skills.build`` (tens of minutes);
here the point is the pipeline: data -> PEFT folder -> GGUF adapter -> llama.cpp, the loss
taken on the completion only, and reproducibility from the seed.
"""

from __future__ import annotations

import json

import pytest
import torch

import edgegemma
from edgegemma import skills, train
from edgegemma.adapters import inspect
from edgegemma.adapters.peft import read_peft
from edgegemma.errors import InvalidParameterError

PROMPT = skills.prompt("sensor", "temp=95.5C vib=0.2g batt=3.9V")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "examples.jsonl"
    chosen = skills.examples("sensor", "train")[:8]
    path.write_text(
        "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in chosen)
    )
    return path


@pytest.fixture(scope="module")
def tiny_run(data, gguf_path, tmp_path_factory):
    """8 examples, batch 4, 2 epochs: 4 optimisation steps through the command line."""
    out = tmp_path_factory.mktemp("run")
    argv = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        str(gguf_path),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "2e-3",
        "--seed",
        "7",
        "--threads",
        "2",
    ]
    assert train.main(argv) == 0
    return out


def test_writes_a_peft_folder_and_a_gguf_adapter(tiny_run):
    config = json.loads((tiny_run / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    peft = read_peft(tiny_run)
    assert len(peft.weights) == 18 * 4
    # LoRA starts with B = 0; four steps must have moved it.
    assert all(abs(w.b).max() > 0 for w in peft.weights.values())
    summary = inspect(tiny_run / "adapter.gguf")
    assert summary.rank == 4 and summary.alpha == 8 and len(summary.targets) == 72
    record = json.loads((tiny_run / "training.json").read_text())
    assert record["steps"] == 4 and record["examples"] == 8 and record["examples_per_s"] > 0


def test_loss_falls_and_the_adapter_runs_in_llama_cpp(tiny_run, gguf_path):
    losses = json.loads((tiny_run / "training.json").read_text())["losses"]
    # The first step sees the label words cold (loss ~8: the base model does not expect them
    # after "Status:"); four steps at lr 2e-3 bring it well down.
    assert losses[-1] < losses[0] / 2, losses
    with edgegemma.load(gguf_path, n_ctx=256, n_threads=2) as engine:
        engine.load_adapter("tiny", tiny_run / "adapter.gguf")
        base = engine.generate(PROMPT, max_tokens=3, adapters=None)
        tuned = engine.generate(PROMPT, max_tokens=3, adapters={"tiny": 1.0})
    assert tuned.text != base.text
    # Even four steps teach the answer format: a label and then the end of the answer.
    assert skills.sensor_label(tuned.text) in ("normal", "warning", "critical")


def test_same_seed_same_adapter(data, gguf_path, tmp_path):
    config = train.TrainConfig(
        model=str(gguf_path), epochs=1, batch_size=4, rank=2, seed=3, threads=2
    )
    examples = train.read_examples(data)[:4]
    first = train.train(examples, tmp_path / "a", config, progress=False)
    second = train.train(examples, tmp_path / "b", config, progress=False)
    assert first.losses == second.losses
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (first.out / name).read_bytes() == (second.out / name).read_bytes()
    assert first.gguf_path.read_bytes() == second.gguf_path.read_bytes()


def test_loss_is_taken_on_the_completion_and_eos_only():
    # BOS, 3 prompt tokens, 2 completion tokens, EOS; and a shorter second example.
    batch = [([2, 10, 11, 12, 20, 21, 1], 4), ([2, 10, 30, 1], 3)]
    ids, mask, (rows, cols), targets = train._collate(batch, pad_id=0, torch=torch)
    assert ids.tolist() == [[2, 10, 11, 12, 20, 21, 1], [2, 10, 30, 1, 0, 0, 0]]
    assert mask.tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    # Position p predicts token p + 1: the last prompt token predicts the first completion token.
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 3), (0, 4), (0, 5), (1, 2)]
    assert targets.tolist() == [20, 21, 1, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n', 'string "prompt" and "completion"'),
        ('{"prompt": "a", "completion": ""}\n', "completion is empty"),
        ("not json\n", ":1: not valid JSON"),
        ("\n\n", "holds no examples"),
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "\\ud800", "completion": "b"}\n',
            ":2: a string holds a lone surrogate",
        ),
        ("[" * 100_000 + "]" * 100_000 + "\n", ":1: nested more than 64 levels"),
        ('{"prompt": NaN, "completion": "b"}\n', "NaN is not JSON"),
    ],
)
def test_bad_data_is_refused_with_the_line(content, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidParameterError, match=message):
        train.read_examples(path)


def test_line_separators_inside_strings_are_text_not_line_ends(tmp_path):
    """U+2028, U+2029 and U+0085 are valid inside JSON strings (str.splitlines split on them)."""
    path = tmp_path / "data.jsonl"
    seps = ("\u2028", "\u2029", "\x85", "\x0c")
    lines = [{"prompt": f"a{sep}b", "completion": f"c{sep}"} for sep in seps]
    path.write_text(
        "\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n",
        encoding="utf-8",
    )
    examples = train.read_examples(path)
    assert [(e.prompt, e.completion) for e in examples] == [
        (d["prompt"], d["completion"]) for d in lines
    ]


@pytest.mark.parametrize(
    "config",
    [
        train.TrainConfig(targets=("q", "embed")),
        train.TrainConfig(rank=0),
        train.TrainConfig(lr=-1.0),
    ],
    ids=["unknown-target", "rank-0", "negative-lr"],
)
def test_bad_settings_are_refused_before_loading_anything(config, data, tmp_path):
    with pytest.raises(InvalidParameterError):
        train.train(data, tmp_path / "out", config, progress=False)


def test_missing_data_file_is_an_error_not_a_traceback(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "training data not found" in capsys.readouterr().err
