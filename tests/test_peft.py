"""Reading PEFT LoRA folders with numpy only: weights, scales, and clear refusals."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from edgegemma.adapters.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_peft,
    read_safetensors,
    write_peft,
    write_safetensors,
)
from edgegemma.errors import AdapterError

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def _weights(rank: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        Q: (
            rng.normal(size=(rank, 640)).astype(np.float32),
            rng.normal(size=(1024, rank)).astype(np.float32),
        ),
        V: (
            rng.normal(size=(rank, 640)).astype(np.float32),
            rng.normal(size=(256, rank)).astype(np.float32),
        ),
    }


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_round_trip_keeps_weights_and_computes_the_scale(tmp_path):
    weights = _weights()
    adapter = read_peft(write_peft(tmp_path / "a", weights, alpha=8))
    assert adapter.rank == 4 and adapter.alpha == 8 and not adapter.use_rslora
    assert adapter.target_modules == ("q_proj", "v_proj")
    assert set(adapter.weights) == {Q, V}
    np.testing.assert_array_equal(adapter.weights[Q].a, weights[Q][0])
    np.testing.assert_array_equal(adapter.weights[Q].b, weights[Q][1])
    assert adapter.weights[Q].scale == 2.0 and adapter.weights[Q].rank == 4


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    adapter = read_peft(write_peft(tmp_path / "a", _weights(), alpha=8, use_rslora=True))
    assert adapter.weights[V].scale == pytest.approx(8 / math.sqrt(4))


def test_alpha_and_rank_patterns_apply_per_module(tmp_path):
    weights = _weights()
    weights[V] = (weights[V][0][:2], weights[V][1][:, :2])  # v_proj at rank 2
    folder = tmp_path / "a"
    folder.mkdir()
    write_safetensors(
        folder / WEIGHTS_FILE,
        {
            f"base_model.model.{m}.lora_{ab}.weight": w
            for m, (a, b) in weights.items()
            for ab, w in (("A", a), ("B", b))
        },
    )
    (folder / CONFIG_FILE).write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "rank_pattern": {"v_proj": 2},
                "alpha_pattern": {"v_proj": 1},
            }
        )
    )
    adapter = read_peft(folder)
    assert adapter.weights[Q].scale == 2.0
    assert adapter.weights[V].rank == 2 and adapter.weights[V].scale == 0.5


def test_bfloat16_and_float16_tensors_are_read(tmp_path):
    values = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    f16 = values.astype("<f2").tobytes()
    header = {
        "bf": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "half": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]},
        "__metadata__": {"format": "pt"},
    }
    encoded = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bf16 + f16)
    tensors = read_safetensors(path)
    np.testing.assert_array_equal(tensors["bf"], values)
    np.testing.assert_array_equal(tensors["half"], values)


def test_adapter_name_in_tensor_keys_is_accepted(tmp_path):
    folder = write_peft(tmp_path / "a", _weights(), alpha=8)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    write_safetensors(
        folder / WEIGHTS_FILE,
        {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
    )
    assert set(read_peft(folder).weights) == {Q, V}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "biases"),
        ({"lora_bias": True}, "bias"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"r": 0}, "rank"),
        ({"r": 8}, "config says 8"),
        ({"lora_alpha": "big"}, "lora_alpha"),
        ({"lora_alpha": 1e300}, "lora_alpha must be a finite number of magnitude at most"),
        ({"r": 10**9}, "no valid rank"),
        ({"rank_pattern": {"q_proj": 0}}, "rank from 1"),
        ({"rank_pattern": {"q_proj": "4"}}, "rank from 1"),
        ({"rank_pattern": ["q_proj"]}, "must map module patterns"),
        ({"alpha_pattern": {"(": 4}}, "invalid pattern"),
        ({"alpha_pattern": {"q_proj": 1e300}}, "magnitude at most"),
        ({"alpha_pattern": {"q_proj": None}}, "magnitude at most"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(tmp_path, changes, message):
    folder = write_peft(tmp_path / "a", _weights(), alpha=8)
    _edit_config(folder, **changes)
    with pytest.raises(AdapterError, match=message):
        read_peft(folder)


def test_broken_weights_are_refused(tmp_path):
    folder = write_peft(tmp_path / "a", _weights(), alpha=8)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated"):
        read_peft(folder)
    (folder / WEIGHTS_FILE).write_bytes(b"\xff" * 16)
    with pytest.raises(AdapterError, match="not a safetensors file"):
        read_peft(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match="not found"):
        read_peft(folder)


@pytest.mark.parametrize("shape", [None, [-4, 8], [4.0, 8], [True, 8], "4x8", [1] * 9])
def test_malformed_tensor_shapes_are_refused(tmp_path, shape):
    folder = write_peft(tmp_path / "a", _weights(), alpha=8)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = shape
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (folder / WEIGHTS_FILE).write_bytes(
        struct.pack("<Q", len(encoded)) + encoded + data[8 + size :]
    )
    with pytest.raises(AdapterError, match="malformed shape"):
        read_peft(folder)


def test_missing_half_non_finite_and_foreign_tensors_are_refused(tmp_path):
    weights = _weights()
    folder = write_peft(tmp_path / "a", weights, alpha=8)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    only_a = {k: v for k, v in tensors.items() if "lora_B" not in k or "v_proj" not in k}
    write_safetensors(folder / WEIGHTS_FILE, only_a)
    with pytest.raises(AdapterError, match="both lora_A and lora_B"):
        read_peft(folder)
    nan = dict(tensors)
    nan[f"base_model.model.{Q}.lora_A.weight"] = np.full((4, 640), np.nan, dtype=np.float32)
    write_safetensors(folder / WEIGHTS_FILE, nan)
    with pytest.raises(AdapterError, match="NaN"):
        read_peft(folder)
    embedding = {
        **tensors,
        "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 8), np.float32),
    }
    write_safetensors(folder / WEIGHTS_FILE, embedding)
    with pytest.raises(AdapterError, match="unsupported tensor"):
        read_peft(folder)


def test_a_folder_without_config_is_not_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        read_peft(tmp_path)
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        read_peft(tmp_path / "missing")


def test_peft_itself_reads_what_write_peft_writes(tmp_path):
    """The folder is a real PEFT adapter: peft + safetensors load it (needs the convert extra)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    peft_config = pytest.importorskip("peft").LoraConfig
    folder = write_peft(tmp_path / "a", _weights(), alpha=8)
    config = peft_config.from_pretrained(str(folder))
    assert (
        config.r == 4
        and config.lora_alpha == 8
        and set(config.target_modules) == {"q_proj", "v_proj"}
    )
    loaded = safetensors_torch.load_file(str(folder / WEIGHTS_FILE))
    np.testing.assert_array_equal(
        loaded[f"base_model.model.{Q}.lora_A.weight"].numpy(), _weights()[Q][0]
    )
