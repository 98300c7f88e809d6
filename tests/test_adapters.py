"""PEFT -> GGUF conversion: llama.cpp with the converted adapter computes what PEFT computes.

The reference is transformers + PEFT on the float checkpoint dequantized from the locked
GGUF. llama.cpp runs the same weights, dequantized to float32 into a GGUF of their own
(built once per cache, like every conversion): against the Q4_K_M file itself, llama.cpp's
8-bit activation quantization alone moves the logits by ~0.2 RMS -- as much as a small
adapter does -- while the float32 copy matches transformers to < 0.01 (measured), so the
adapter's effect can be compared tightly.
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct
from pathlib import Path

import llama_cpp as ll
import numpy as np
import pytest
from loras import edit_peft_config, random_peft

import edgegemma
from edgegemma import adapters
from edgegemma.adapters.peft import (
    WEIGHTS_FILE,
    read_safetensors,
    write_safetensors,
)
from edgegemma.builds import cached_build
from edgegemma.errors import AdapterError
from edgegemma.files import sha256_file
from edgegemma.gguffile import read_header, tensor_array

PROMPT = "The gateway reported temp=81.2C vib=0.93g and then"
MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_gguf(gguf_path) -> Path:
    """The locked model with every tensor dequantized to float32 (1.1 GB, cached)."""
    key = {"source_sha256": sha256_file(gguf_path), "recipe": "1"}
    folder = cached_build(
        "test-gguf-f32", key, lambda out: _write_f32_copy(gguf_path, out / "model.gguf")
    )
    return folder / "model.gguf"


@pytest.fixture(scope="module")
def llama(f32_gguf, engine):
    # Opening the shared engine first installs edgegemma's llama.cpp log handler, which keeps
    # the native library's chatter out of the test output.
    runner = _LlamaLogits(f32_gguf)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edgegemma.convert.checkpoint import float_checkpoint

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(float_checkpoint(gguf_path), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokens(llama):
    return llama.tokenize(PROMPT)


@pytest.fixture(scope="module")
def base_logits(llama, hf_model, tokens):
    ours, reference = llama.logits(tokens), _hf_logits(hf_model, tokens)
    # The float32 copy is the float model: what remains is summation order and f32 rounding.
    assert np.abs(ours - reference).max() < 0.02
    return ours, reference


_peft = functools.partial(random_peft, std=0.02, modules=tuple(MODULES))
"""A random PEFT adapter on every target module (this file's default)."""


def _hf_logits(model, tokens, peft_dir: Path | None = None) -> np.ndarray:
    import torch
    from peft import PeftModel

    ids = torch.tensor([tokens])
    with torch.no_grad():
        if peft_dir is None:
            return model(ids).logits[0, -1].double().numpy()
        adapted = PeftModel.from_pretrained(model, peft_dir)
        try:
            return adapted(ids).logits[0, -1].double().numpy()
        finally:
            adapted.unload()  # leaves the shared base model as it was


def _compare(delta: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Cosine and relative error of llama.cpp's change in logits against the reference change."""
    cosine = float(delta @ reference / np.linalg.norm(delta) / np.linalg.norm(reference))
    return cosine, float(np.linalg.norm(delta - reference) / np.linalg.norm(reference))


# -- conventions ------------------------------------------------------------------------


def test_tensors_follow_llama_cpp_converter_conventions(tmp_path, gguf_path):
    peft = _peft(tmp_path / "peft", seed=1, rank=4, alpha=8, layers=(0, 17))
    out = adapters.convert(peft, "gguf", tmp_path / "a.gguf", model=gguf_path, dtype="f32")
    header = read_header(out)
    assert header.file_type == "adapter" and header.metadata["adapter.type"] == "lora"
    assert header.architecture == "gemma3"
    assert (
        header.metadata["adapter.lora.alpha"] == 8.0
    )  # PEFT's lora_alpha, as llama.cpp's converter
    tensors = read_safetensors(peft / WEIGHTS_FILE)
    assert len(header.tensors) == 2 * 2 * len(MODULES)
    for layer in (0, 17):
        for module, name in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            # lora_a = PEFT lora_A (rank, n_in), lora_b = PEFT lora_B (n_out, rank), unscaled.
            np.testing.assert_array_equal(
                tensor_array(header, f"blk.{layer}.{name}.weight.lora_a"),
                tensors[f"{key}.lora_A.weight"],
            )
            np.testing.assert_array_equal(
                tensor_array(header, f"blk.{layer}.{name}.weight.lora_b"),
                tensors[f"{key}.lora_B.weight"],
            )


def test_f16_output_halves_the_size_and_rounds_only(tmp_path, gguf_path):
    peft = _peft(tmp_path / "peft", seed=2, modules=("self_attn.q_proj",))
    f32 = adapters.convert(peft, "gguf", tmp_path / "f32.gguf", model=gguf_path, dtype="f32")
    f16 = adapters.convert(peft, "gguf", tmp_path / "f16.gguf", model=gguf_path)
    assert f16.stat().st_size < 0.55 * f32.stat().st_size
    name = "blk.5.attn_q.weight.lora_b"
    np.testing.assert_allclose(
        tensor_array(read_header(f16), name).astype(np.float32),
        tensor_array(read_header(f32), name),
        rtol=1e-3,
        atol=1e-7,
    )


# -- llama.cpp computes what PEFT computes ----------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="plain"),
        # PEFT scales rsLoRA by alpha / sqrt(r); llama.cpp's own converter would be off by sqrt(8).
        pytest.param({"use_rslora": True}, id="rslora"),
        # Per-module alpha, which one GGUF alpha cannot hold: folded into B.
        pytest.param({"alpha_pattern": {"v_proj": 4, "down_proj": 64}}, id="alpha_pattern"),
    ],
)
def test_llama_cpp_logits_match_transformers_peft(
    config, tmp_path, gguf_path, llama, hf_model, tokens, base_logits
):
    peft = _peft(tmp_path / "peft", seed=3, **config)
    out = adapters.convert(peft, "gguf", tmp_path / "a.gguf", model=gguf_path, dtype="f32")
    llama_delta = llama.logits(tokens, out) - base_logits[0]
    hf_delta = _hf_logits(hf_model, tokens, peft) - base_logits[1]
    cosine, error = _compare(llama_delta, hf_delta)
    # The change is 1000-2000 in norm (the two base models differ by < 0.01 per logit);
    # measured: cosine 0.999998, relative error 0.16-0.24 %. A wrong scale, swapped or
    # transposed matrices, or a module mapped to the wrong tensor are off by tens of percent.
    assert cosine > 0.9999 and error < 0.02, (cosine, error)


def test_attention_only_adapter_matches_transformers(
    tmp_path, gguf_path, llama, hf_model, tokens, base_logits
):
    peft = _peft(tmp_path / "peft", seed=4, modules=tuple(MODULES)[:4])
    out = adapters.convert(peft, "gguf", tmp_path / "a.gguf", model=gguf_path)
    cosine, error = _compare(
        llama.logits(tokens, out) - base_logits[0],
        _hf_logits(hf_model, tokens, peft) - base_logits[1],
    )
    # float16 matrices (the default output): measured relative error 0.56 %.
    assert cosine > 0.999 and error < 0.03, (cosine, error)


def test_scale_zero_is_the_base_and_alpha_scales_the_delta(
    tmp_path, gguf_path, llama, tokens, base_logits
):
    small = {"seed": 5, "std": 0.003, "modules": ("self_attn.v_proj", "mlp.down_proj")}
    a16 = adapters.convert(
        _peft(tmp_path / "a16", alpha=16, **small),
        "gguf",
        tmp_path / "a16.gguf",
        model=gguf_path,
        dtype="f32",
    )
    a32 = adapters.convert(
        _peft(tmp_path / "a32", alpha=32, **small),
        "gguf",
        tmp_path / "a32.gguf",
        model=gguf_path,
        dtype="f32",
    )
    base = base_logits[0]
    np.testing.assert_array_equal(llama.logits(tokens, a16, scale=0.0), base)
    # alpha/r is a plain factor on B @ A: alpha 32 at scale 1 is alpha 16 at scale 2 ...
    np.testing.assert_array_equal(llama.logits(tokens, a32), llama.logits(tokens, a16, scale=2.0))
    # ... and for a small adapter (where logits are nearly linear in it) doubling alpha doubles
    # the change: measured 1.92-2.08 along the change at alpha 16 for std 0.002-0.004
    # (float32 noise and the first nonlinear terms); ignoring alpha would give 1.
    d16, d32 = llama.logits(tokens, a16) - base, llama.logits(tokens, a32) - base
    assert np.linalg.norm(d16) > 3  # well above llama.cpp's float32 noise (~1 in norm here)
    assert 1.8 < (d32 @ d16) / (d16 @ d16) < 2.2


def test_shipped_engine_swaps_a_converted_adapter(tmp_path, gguf_path):
    peft = _peft(tmp_path / "peft", seed=6, std=0.05, modules=tuple(MODULES)[:4])
    out = adapters.convert(peft, "gguf", None, model=gguf_path)
    assert out == peft / "adapter.gguf"
    with edgegemma.load(gguf_path, n_ctx=256, n_threads=2) as engine:
        engine.load_adapter("random", out)
        base = engine.generate("The capital of France is", max_tokens=8, adapters=None)
        adapted = engine.generate(
            "The capital of France is", max_tokens=8, adapters={"random": 1.0}
        )
        zero = engine.generate("The capital of France is", max_tokens=8, adapters={"random": 0.0})
    assert adapted.token_ids != base.token_ids
    assert zero.token_ids == base.token_ids


# -- refusals ---------------------------------------------------------------------------


def _with_tensors(folder: Path, **arrays: np.ndarray) -> None:
    """Add or replace tensors; keyword ``x__y`` stands for tensor ``base_model.model.x.y``."""
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    for key, value in arrays.items():
        tensors["base_model.model." + key.replace("__", ".")] = value
    write_safetensors(folder / WEIGHTS_FILE, tensors)


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: edit_peft_config(f, use_dora=True), "DoRA"),
        (lambda f: edit_peft_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda f: edit_peft_config(f, peft_type="IA3"), "only LoRA"),
        (
            lambda f: _with_tensors(f, model__embed_tokens__lora_embedding_A=_zeros(8, 262144)),
            "embed_tokens",
        ),
        (
            lambda f: _with_tensors(
                f, lm_head__lora_A__weight=_zeros(8, 640), lm_head__lora_B__weight=_zeros(262144, 8)
            ),
            "lm_head",
        ),
        (
            lambda f: _with_tensors(
                f,
                model__layers__18__self_attn__q_proj__lora_A__weight=_zeros(8, 640),
                model__layers__18__self_attn__q_proj__lora_B__weight=_zeros(1024, 8),
            ),
            "blk.18.attn_q.weight",
        ),
        (
            lambda f: _with_tensors(
                f, model__layers__0__self_attn__q_proj__lora_A__weight=_zeros(8, 2048)
            ),
            "another model",
        ),
        (
            lambda f: _with_tensors(
                f,
                model__layers__0__self_attn__q_proj__lora_B__weight=np.full(
                    (1024, 8), 1e6, np.float32
                ),
            ),
            "float16",
        ),
    ],
    ids=[
        "dora",
        "modules_to_save",
        "not-lora",
        "embedding",
        "lm_head",
        "no-such-layer",
        "wrong-shape",
        "f16-overflow",
    ],
)
def test_unsupported_adapters_are_refused_clearly(edit, message, tmp_path, gguf_path):
    peft = _peft(tmp_path / "peft", seed=7, modules=("self_attn.q_proj",), layers=(0,))
    edit(peft)
    with pytest.raises(AdapterError, match=message):
        adapters.convert(peft, "gguf", tmp_path / "a.gguf", model=gguf_path)
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated download
        lambda data: struct.pack("<Q", 1 << 40) + data[8:],  # absurd header length
        lambda data: data[:8] + b"{not json" + data[17:],  # garbled header
        lambda data: b"",
    ],
    ids=["truncated", "header-length", "garbled-header", "empty"],
)
def test_corrupt_safetensors_are_refused(damage, tmp_path, gguf_path):
    peft = _peft(tmp_path / "peft", seed=8, modules=("self_attn.q_proj",), layers=(0,))
    weights = peft / WEIGHTS_FILE
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(AdapterError, match="safetensors|truncated|not found"):
        adapters.convert(peft, "gguf", tmp_path / "a.gguf", model=gguf_path)


# -- command line -----------------------------------------------------------------------


def test_cli_convert_inspect_validate(tmp_path, gguf_path, capsys):
    peft = _peft(tmp_path / "peft", seed=9, modules=tuple(MODULES)[:4])
    out = tmp_path / "a.gguf"
    assert (
        adapters.main(
            ["convert", str(peft), "--to", "gguf", "-o", str(out), "--model", str(gguf_path)]
        )
        == 0
    )
    assert adapters.main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank         8" in printed and "alpha        16 (scale 2" in printed
    assert "attn_q (layers 0-17)" in printed and "72 weights adapted" in printed
    assert adapters.main(["inspect", str(peft)]) == 0
    assert "self_attn.q_proj (layers 0-17)" in capsys.readouterr().out
    assert adapters.main(["validate", str(out), "--model", str(gguf_path)]) == 0
    assert "loads in the llamacpp backend" in capsys.readouterr().out


def test_cli_reports_errors_without_a_traceback(tmp_path, gguf_path, capsys):
    other = tmp_path / "other.gguf"
    from edgegemma.adapters.gguf import write_lora_gguf

    write_lora_gguf(
        other,
        architecture="gemma3",
        alpha=8,
        weights={
            "blk.0.attn_q.weight": (
                np.zeros((4, 512), np.float32),
                np.zeros((1024, 4), np.float32),
            ),
        },
    )
    assert adapters.main(["validate", str(other), "--model", str(gguf_path)]) == 1
    assert "another model size" in capsys.readouterr().err
    assert adapters.main(["convert", str(tmp_path), "--to", "gguf", "--model", str(gguf_path)]) == 1
    assert "adapter_config.json not found" in capsys.readouterr().err


def test_onnx_target_names_what_it_needs_or_converts(tmp_path, gguf_path):
    peft = _peft(tmp_path / "peft", seed=10, modules=("self_attn.q_proj",), layers=(0,))
    try:
        out = adapters.convert(peft, "onnx", tmp_path / "a.onnx_adapter", model=gguf_path)
    except edgegemma.EdgeGemmaError as exc:
        # Without the runtime or a cached ONNX build, the message says what to install or run.
        assert "pip install 'edgegemma[onnx]'" in str(exc) or "edgegemma convert" in str(exc)
    else:
        assert out.stat().st_size > 0


def test_litert_target_converts_with_numpy_alone(tmp_path, gguf_path, capsys):
    peft = _peft(tmp_path / "peft", seed=11, modules=tuple(MODULES)[:4])
    assert adapters.main(["convert", str(peft), "--to", "litert", "--model", str(gguf_path)]) == 0
    assert adapters.main(["inspect", str(peft / "adapter.lora")]) == 0
    printed = capsys.readouterr().out
    # LiteRT-LM runs ranks 16 and 32 only: rank 8 is zero-padded, the scale folded in.
    assert "rank         16" in printed and "q (layers 0-17)" in printed and "folded" in printed
    mlp = _peft(tmp_path / "mlp", seed=12, modules=("mlp.up_proj",), layers=(0,))
    with pytest.raises(AdapterError, match="attention projections"):
        adapters.convert(mlp, "litert", tmp_path / "mlp.lora", model=gguf_path)


# -- helpers ----------------------------------------------------------------------------


class _LlamaLogits:
    """Next-token logits straight from llama.cpp (the engine deliberately exposes none)."""

    def __init__(self, path: Path):
        self._model = ll.llama_model_load_from_file(
            str(path).encode(), ll.llama_model_default_params()
        )
        assert self._model, f"llama.cpp could not load {path}"
        params = ll.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 256
        params.n_threads = params.n_threads_batch = 2
        params.type_k = params.type_v = 0  # GGML_TYPE_F32: keep the KV cache in float32 too
        self._ctx = ll.llama_init_from_model(self._model, params)
        self._vocab = ll.llama_model_get_vocab(self._model)
        self._adapters: dict[Path, object] = {}

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (ll.llama_token * (len(data) + 8))()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, len(buf), True, False)
        return list(buf[:n])

    def logits(
        self, tokens: list[int], adapter: Path | None = None, scale: float = 1.0
    ) -> np.ndarray:
        if adapter is None:
            ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            if adapter not in self._adapters:
                handle = ll.llama_adapter_lora_init(self._model, str(adapter).encode())
                assert handle, f"llama.cpp refused {adapter}"
                self._adapters[adapter] = handle
            handles = (ll.llama_adapter_lora_p_ctypes * 1)(self._adapters[adapter])
            assert (
                ll.llama_set_adapters_lora(self._ctx, handles, 1, (ctypes.c_float * 1)(scale)) == 0
            )
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        array = (ll.llama_token * len(tokens))(*tokens)
        assert ll.llama_decode(self._ctx, ll.llama_batch_get_one(array, len(tokens))) == 0
        n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        return np.ctypeslib.as_array(
            ll.llama_get_logits_ith(self._ctx, -1), shape=(n_vocab,)
        ).astype(np.float64)

    def close(self) -> None:
        ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        for handle in self._adapters.values():
            ll.llama_adapter_lora_free(handle)
        ll.llama_free(self._ctx)
        ll.llama_model_free(self._model)


def _write_f32_copy(source: Path, target: Path) -> None:
    """``source`` with every tensor dequantized to float32; metadata copied byte for byte.

    Written by hand because the gguf package's reader takes ~1 min on a 262k vocabulary.
    """
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    header = read_header(source)
    data = source.read_bytes()
    kv_end = _metadata_end(data)
    alignment = header.metadata.get("general.alignment", 32)
    infos, offset = [], 0
    for name, info in header.tensors.items():
        encoded = name.encode()
        infos.append(
            struct.pack("<Q", len(encoded))
            + encoded
            + struct.pack(f"<I{len(info.shape)}Q", len(info.shape), *info.shape)
            + struct.pack("<IQ", 0, offset)  # type 0 = F32
        )
        offset += -(-math.prod(info.shape) * 4 // alignment) * alignment
    with open(target, "wb") as out:
        out.write(data[:24] + data[24:kv_end] + b"".join(infos))
        out.write(b"\0" * (-out.tell() % alignment))
        for info in header.tensors.values():
            raw = np.frombuffer(data, np.uint8, info.nbytes, info.offset)
            block, size = GGML_QUANT_SIZES[info.type]
            values = dequantize(raw.reshape(-1, info.shape[0] // block * size), info.type).astype(
                "<f4"
            )
            blob = values.tobytes()
            out.write(blob + b"\0" * (-len(blob) % alignment))


def _metadata_end(data: bytes) -> int:
    """Offset just past the key/value section of a GGUF file (version 3)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    pos = 24

    def skip_value(kind: int) -> int:
        nonlocal pos
        if kind in sizes:
            pos += sizes[kind]
        elif kind == 8:
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        else:  # array
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item in sizes:
                pos += sizes[item] * count
            else:
                for _ in range(count):
                    skip_value(item)
        return pos

    for _ in range(n_kv):
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]  # key
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        skip_value(kind)
    return pos
