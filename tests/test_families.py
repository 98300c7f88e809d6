"""Every Gemma family against transformers, on tiny random-weight checkpoints (tests/families.py).

For each family the family table (:mod:`edgegemma.families`) says llama.cpp runs: the
checkpoint converted by ``edgegemma convert DIR --to gguf --quant f32`` gives transformers'
greedy tokens and last-position logits through ``edgegemma.load``; a PEFT LoRA converted
by ``edgegemma adapters convert`` gives PEFT's tokens; the engine's features run on it. What
the table refuses is refused before any work, with the architecture, the capability and why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import families as families_helper
import numpy as np
import pytest
from families import FAMILIES, checkpoint, random_peft, reference

import edgegemma
from edgegemma import UnsupportedArchitectureError, families
from edgegemma.adapters import main as adapters_main
from edgegemma.bench.cli import main as bench_main
from edgegemma.cli import main as cli_main
from edgegemma.convert.gguf import runtime_differences
from edgegemma.train import main as train_main

PROMPT = "The capital of France is"
N_TOKENS = 12
LLAMA_CPP_FAMILIES = [f for f in FAMILIES if families.FAMILIES[f].supports("backend:llamacpp")]
ONNX_FAMILIES = [f for f in FAMILIES if families.FAMILIES[f].supports("convert:onnx")]


@pytest.fixture(scope="module")
def converted():
    return lambda family: families_helper.converted(family, "gguf")


@pytest.fixture(scope="module")
def onnx_built():
    return lambda family: families_helper.converted(family, "onnx")


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_onnx_matches_transformers(family, onnx_built):
    with edgegemma.load(onnx_built(family), backend="onnx", n_ctx=512, n_threads=2) as engine:
        assert engine.info.architecture == family
        ids = engine.tokenize(PROMPT)
        expected, _ = reference(checkpoint(family), ids, N_TOKENS)
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_onnx_lora_matches_peft(family, onnx_built, tmp_path):
    base = checkpoint(family)
    peft_dir = random_peft(base, tmp_path / "peft", ("q_proj", "v_proj"))
    adapter = tmp_path / "adapter.onnx_adapter"
    model = onnx_built(family)
    assert (
        adapters_main(
            ["convert", str(peft_dir), "--to", "onnx", "--model", str(model), "-o", str(adapter)]
        )
        == 0
    )
    with edgegemma.load(model, backend="onnx", n_ctx=512, n_threads=2) as engine:
        ids = engine.tokenize(PROMPT)
        expected, _ = reference(base, ids, N_TOKENS, peft_dir=peft_dir)
        engine.load_adapter("skill", adapter)
        result = engine.generate(PROMPT, max_tokens=N_TOKENS, adapters={"skill": 1.0})
        assert result.token_ids == expected


def _until_end(tokens: list[int], engine: edgegemma.Engine) -> list[int]:
    """transformers' tokens up to the first end-of-generation token, where the engine stops."""
    ends = [i for i, t in enumerate(tokens) if t in engine.info.eog_ids]
    return tokens[: ends[0]] if ends else tokens


def _logits(engine: edgegemma.Engine, ids: list[int]) -> np.ndarray:
    """The last prompt position's logits, read from the backend as the engine sampled them."""
    backend = engine._backend
    backend.start(ids, reuse=0, adapters=[], sampling=edgegemma.SamplingParams())
    logits = np.array(backend.logits(), dtype=np.float64)
    engine.reset()
    return logits


@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_gguf_matches_transformers(family, converted):
    with edgegemma.load(converted(family), n_ctx=256, n_threads=2) as engine:
        assert engine.info.architecture == family
        ids = engine.tokenize(PROMPT)
        expected, expected_logits = reference(checkpoint(family), ids, N_TOKENS)
        result = engine.generate(PROMPT, max_tokens=N_TOKENS, temperature=0)
        assert result.token_ids == expected
        logits = _logits(engine, ids)
    assert np.corrcoef(logits, expected_logits)[0, 1] >= 0.9999
    assert np.abs(logits - expected_logits).max() < 5e-3


@pytest.mark.parametrize("targets", ["qv", "all"])
@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_peft_lora_matches_peft(family, targets, converted, tmp_path):
    modules = (
        ("q_proj", "v_proj")
        if targets == "qv"
        else ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    base = checkpoint(family)
    peft_dir = random_peft(base, tmp_path / "peft", modules)
    adapter = tmp_path / "adapter.gguf"
    code = adapters_main(
        ["convert", str(peft_dir), "--to", "gguf", "--model", str(converted(family)),
         "--dtype", "f32", "-o", str(adapter)]
    )  # fmt: skip
    assert code == 0
    with edgegemma.load(converted(family), n_ctx=256, n_threads=2) as engine:
        ids = engine.tokenize(PROMPT)
        expected, _ = reference(base, ids, N_TOKENS, peft_dir=peft_dir)
        without, _ = reference(base, ids, N_TOKENS)
        engine.load_adapter("skill", adapter)
        result = engine.generate(
            PROMPT, max_tokens=N_TOKENS, temperature=0, adapters={"skill": 1.0}
        )
        assert result.token_ids == expected
        # Swapped out at runtime: the base's own tokens again, no reload.
        assert engine.generate(PROMPT, max_tokens=N_TOKENS, temperature=0).token_ids == without


@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_engine_features_run(family, converted):
    """Classify, a constraint, chat and a batch run on each family's model."""
    with edgegemma.load(converted(family), n_ctx=512, n_threads=2) as engine:
        labels = ["alpha", "beta", "gamma"]
        verdict = engine.classify("Pick one:", labels)
        assert verdict.label in labels and abs(sum(verdict.scores.values()) - 1) < 1e-6
        constrained = engine.generate("Answer:", max_tokens=8, choices=["yes", "no"])
        assert constrained.text in ("yes", "no")
        batch = engine.generate_many([PROMPT, "Hello", "One two"], max_tokens=4, temperature=0)
        alone = [
            engine.generate(p, max_tokens=4, temperature=0).token_ids
            for p in (PROMPT, "Hello", "One two")
        ]
        assert [r.token_ids for r in batch] == alone
        messages = [{"role": "user", "content": "Hi"}]
        if families.FAMILIES[family].supports("chat-template") or engine.info.chat_template:
            assert "<start_of_turn>user\nHi<end_of_turn>" in engine.apply_chat_template(messages)
            assert engine.chat(messages, max_tokens=4).stats.prompt_tokens > 0
        else:
            with pytest.raises(
                UnsupportedArchitectureError,
                match=f"{family}.*chat-template|{family}.*chat template",
            ):
                engine.chat(messages, max_tokens=4)


def test_bench_runs_a_model_of_another_family_by_path(converted, tmp_path):
    """The bench takes any model path: a tiny Gemma 4 measured like the shipped model."""
    report = tmp_path / "bench.json"
    code = bench_main(
        ["--backend", "llamacpp", "--model", str(converted("gemma4")), "-p", "16", "-n", "8",
         "--task", "none", "--no-baseline", "-r", "1", "--warmup", "0", "--n-ctx", "256",
         "--json", str(report)]
    )  # fmt: skip
    assert code == 0
    text = report.read_text()
    assert converted("gemma4").name in text and '"decode_tps"' in text


TRAIN_FAMILIES = [f for f in FAMILIES if families.FAMILIES[f].supports("train")]


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_train_matches_peft(family, converted, tmp_path):
    """``edgegemma train --model FOLDER --gguf FILE``: a few steps on the checkpoint, and its
    adapter.gguf on llama.cpp gives what the trained PEFT adapter gives in transformers."""
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Reading {i}:", "completion": " ok" if i % 2 else " alarm"})
            + "\n"
            for i in range(8)
        )
    )
    out = tmp_path / "trained"
    argv = ["--data", str(data), "--out", str(out), "--model", str(checkpoint(family)),
            "--gguf", str(converted(family)), "--epochs", "2", "--batch-size", "4",
            "--rank", "16", "--targets", "q,v", "--lr", "0.05"]  # fmt: skip
    assert train_main(argv) == 0
    with edgegemma.load(converted(family), n_ctx=256, n_threads=2) as engine:
        ids = engine.tokenize(PROMPT)
        expected, _ = reference(checkpoint(family), ids, N_TOKENS, peft_dir=out)
        without, _ = reference(checkpoint(family), ids, N_TOKENS)
        engine.load_adapter("trained", out / "adapter.gguf")
        result = engine.generate(PROMPT, max_tokens=N_TOKENS, adapters={"trained": 1.0})
    assert result.token_ids == _until_end(expected, engine)
    assert expected != without, "the training changed the model's answer"


def test_every_cell_of_the_table_is_a_test_or_a_reason():
    for family in families.FAMILIES.values():
        for capability in families.CAPABILITIES:
            evidence = family.supported.get(capability)
            if evidence is None:
                assert family.refused[capability]
                continue
            path, _, name = evidence.partition("::")
            assert Path(__file__).parent.parent.joinpath(path).is_file(), evidence
            if name:  # a test of this family, never another family's
                assert f"[{family.name}" in name and name.split("[")[0] in globals(), evidence


def test_a_refused_capability_names_architecture_capability_and_reason(converted, tmp_path, capsys):
    source = converted("gemma4")
    capsys.readouterr()
    assert cli_main(["convert", str(source), "--to", "onnx", "--precision", "fp32"]) == 1
    said = capsys.readouterr().err
    assert said.startswith(
        f"edgegemma convert: error: {source.name}: gemma4 (Gemma 4 (text)): convert onnx is"
    )
    assert "Gemma4ForConditionalGeneration" in said and "ignore_mismatched_sizes" not in said
    # Gemma 2 builds for ONNX from its checkpoint folder; its GGUF has no way back to one.
    assert (
        cli_main(["convert", str(converted("gemma2")), "--to", "onnx", "--precision", "fp32"]) == 1
    )
    assert (
        "convert from the gemma2 model's Hugging Face checkpoint folder" in capsys.readouterr().err
    )
    with pytest.raises(UnsupportedArchitectureError) as refused:
        families.require("gemma4", "convert:onnx")
    assert refused.value.architecture == "gemma4" and refused.value.capability == "convert:onnx"
    with pytest.raises(UnsupportedArchitectureError, match="gemma4.*backend onnx"):
        edgegemma.load(source, backend="onnx")
    with pytest.raises(UnsupportedArchitectureError, match="gemma4.*backend mediapipe"):
        edgegemma.load(source, backend="mediapipe")
    not_gemma = tmp_path / "llama"
    shutil.copytree(checkpoint("gemma3"), not_gemma)
    config = json.loads((not_gemma / "config.json").read_text())
    (not_gemma / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    out = tmp_path / "x.gguf"
    assert (
        cli_main(["convert", str(not_gemma), "--to", "gguf", "--quant", "f32", "-o", str(out)]) == 1
    )
    assert "model_type 'llama' is not a Gemma family" in capsys.readouterr().err
    assert not out.exists()


def _changed(family: str, folder: Path, **config_changes) -> Path:
    """A copy of ``family``'s checkpoint with ``config_changes`` in its config.json."""
    shutil.copytree(checkpoint(family), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_a_gemma3_attention_scale_other_than_head_dim_still_matches_transformers(tmp_path):
    """transformers scales by query_pre_attn_scalar, llama.cpp by head_dim: the conversion
    folds the difference into the query norm."""
    folder = _changed("gemma3", tmp_path / "scaled", query_pre_attn_scalar=256)
    assert runtime_differences(folder) == []
    out = tmp_path / "scaled.gguf"
    assert cli_main(["convert", str(folder), "--to", "gguf", "--quant", "f32", "-o", str(out)]) == 0
    with edgegemma.load(out, n_ctx=256, n_threads=2) as engine:
        ids = engine.tokenize(PROMPT)
        expected, expected_logits = reference(folder, ids, N_TOKENS)
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected
        assert np.corrcoef(_logits(engine, ids), expected_logits)[0, 1] >= 0.9999


def test_configs_llama_cpp_computes_differently_are_warned_about(tmp_path):
    for family in LLAMA_CPP_FAMILIES:
        assert runtime_differences(checkpoint(family)) == [], family
    layers = ["sliding_attention"] * 5 + ["full_attention"]
    layers[2] = "full_attention"
    gemma3 = _changed("gemma3", tmp_path / "gemma3", layer_types=layers)
    [found] = runtime_differences(gemma3)
    assert "every 6th gemma3 layer full attention" in found
    gemma2 = _changed("gemma2", tmp_path / "gemma2", query_pre_attn_scalar=256)
    [found] = runtime_differences(gemma2)
    assert "query_pre_attn_scalar is 256 but head_dim is 32" in found
    gemma3n = _changed("gemma3n", tmp_path / "gemma3n", num_kv_shared_layers=4)
    [found] = runtime_differences(gemma3n)
    assert "18 layers compute K/V, but llama.cpp shares the K/V of the first 20" in found
    out = tmp_path / "c.gguf"
    with pytest.warns(UserWarning, match="every 6th gemma3 layer"):
        code = cli_main(["convert", str(gemma3), "--to", "gguf", "--quant", "f16", "-o", str(out)])
    assert code == 0 and out.is_file()
