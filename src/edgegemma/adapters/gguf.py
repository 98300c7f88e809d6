"""LoRA adapters in GGUF, llama.cpp's format: convert, write, inspect, check against a base model.

Layout (llama.cpp's own converter and loader): metadata ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``, ``general.architecture`` = the base's;
tensors ``<base tensor>.lora_a`` with numpy shape (rank, n_in) and ``<base tensor>.lora_b``
with numpy shape (n_out, rank). llama.cpp scales the product by ``scale * alpha / rank``.

Converting a PEFT adapter follows llama.cpp's own ``convert_lora_to_gguf.py``: tensors
``blk.N.attn_q.weight.lora_a`` (PEFT ``lora_A``) and ``.lora_b`` (PEFT ``lora_B``), and
``adapter.lora.alpha`` = PEFT's ``lora_alpha``. Where that converter would be wrong, the
scale is made right instead: for rsLoRA (PEFT scales by alpha / sqrt(rank), which llama.cpp's
converter ignores) the file stores alpha * sqrt(rank), and per-module ``alpha_pattern``
values, which one GGUF alpha cannot express, are folded into that module's B.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AdapterError, ModelError
from ..files import writing_atomically
from ..gguffile import GGUFHeader, read_header, tensor_array
from .base import AdapterFormat, AdapterSummary
from .peft import PeftAdapter

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Text decoder layers of Gemma (and Llama-like) checkpoints, also inside a multimodal
# Gemma 3 (``model.language_model.layers``), whose text tower has the same tensors.
_HF_LAYER = re.compile(
    r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.("
    + "|".join(re.escape(k) for k in _GGUF_NAMES)
    + r")"
)
_F16_MAX = float(np.finfo(np.float16).max)


def gguf_tensor_name(module: str) -> str:
    """The llama.cpp tensor a Hugging Face module name adapts, e.g. ``blk.3.attn_q.weight``."""
    match = _HF_LAYER.fullmatch(module)
    if match is None:
        raise AdapterError(
            f"LoRA on {module!r} has no llama.cpp equivalent here: edgegemma converts LoRA on the "
            f"decoder layers' {', '.join(k.split('.')[1] for k in _GGUF_NAMES)}"
        )
    return f"blk.{match[1]}.{_GGUF_NAMES[match[2]]}.weight"


def to_gguf(
    peft: PeftAdapter,
    out_path: str | os.PathLike[str],
    base: GGUFHeader,
    *,
    dtype: str = "f16",
) -> Path:
    """Write ``peft`` as a llama.cpp LoRA adapter for the base model whose header is ``base``.

    ``dtype`` is ``"f16"`` (half the size; the default) or ``"f32"``. Every module is checked
    against the base tensor it adapts, so an adapter for another model fails here, not on
    the device.
    """
    if dtype not in ("f16", "f32"):
        raise AdapterError(f"GGUF adapters are written as f16 or f32, not {dtype!r}")
    # llama.cpp multiplies by alpha / rank of each tensor; rsLoRA wants alpha / sqrt(rank).
    alpha = peft.alpha * math.sqrt(peft.rank) if peft.use_rslora else peft.alpha
    weights = {}
    for module, weight in peft.weights.items():
        name = gguf_tensor_name(module)
        if name not in base.tensors:
            raise AdapterError(
                f"{peft.path.name}: {module} adapts {name}, which {base.path.name} does not have "
                f"(its {base.arch_value('block_count')} blocks are numbered from 0)"
            )
        n_in, n_out = base.tensors[name].shape
        if weight.a.shape[1] != n_in or weight.b.shape[0] != n_out:
            raise AdapterError(
                f"{peft.path.name}: {module} maps {weight.a.shape[1]} -> {weight.b.shape[0]} but "
                f"{base.path.name}'s {name} maps {n_in} -> {n_out} (an adapter for another model?)"
            )
        llama_scale = (
            alpha / weight.rank if alpha else 1.0
        )  # llama.cpp reads alpha 0 as "no scaling"
        b = weight.b
        if not math.isclose(weight.scale, llama_scale, rel_tol=1e-6):
            b = b * np.float32(weight.scale / llama_scale)
        if dtype == "f16" and max(np.abs(weight.a).max(), np.abs(b).max()) > _F16_MAX:
            raise AdapterError(
                f"{peft.path.name}: {module} has values beyond float16; use dtype f32"
            )
        weights[name] = (weight.a, b)
    if len(weights) != len(peft.weights):
        raise AdapterError(f"{peft.path.name}: two modules map to the same llama.cpp tensor")
    out = write_lora_gguf(
        out_path,
        architecture=base.architecture,
        alpha=alpha,
        weights=weights,
        dtype=np.float16 if dtype == "f16" else np.float32,
    )
    return out


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    architecture: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    """Base-model tensor names the adapter modifies."""
    size_bytes: int


def write_lora_gguf(
    path: str | os.PathLike[str],
    *,
    architecture: str,
    alpha: float,
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
    dtype: type = np.float32,
) -> Path:
    """Write ``{base tensor name: (A (rank, n_in), B (n_out, rank))}`` as a GGUF LoRA file."""
    import gguf

    out = Path(path)
    with writing_atomically(out) as partial:
        writer = gguf.GGUFWriter(str(partial), architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, (a, b) in sorted(weights.items()):
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=dtype))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def float32_copy(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path | None:
    """Write the adapter at ``path`` to ``out`` with float32 tensors; None if it has no F16 one.

    With a LoRA attached, llama.cpp's logits depend on how the prompt was split into batches,
    so a prompt partly served from the KV cache can continue differently from the same prompt
    evaluated afresh. Float16 LoRA tensors make that much more frequent: with the shipped
    emoji adapter, 3 of 5 cached continuations diverged as float16 and none as float32.
    """
    header = read_header(Path(path))
    if all(info.type.name != "F16" for info in header.tensors.values()):
        return None
    info = _lora_info(header)
    weights = {
        target: (tensor_array(header, f"{target}.lora_a"), tensor_array(header, f"{target}.lora_b"))
        for target in info.targets
    }
    return write_lora_gguf(out, architecture=info.architecture, alpha=info.alpha, weights=weights)


def inspect_lora(path: str | os.PathLike[str]) -> LoraInfo:
    """Read a GGUF LoRA adapter's header; :class:`AdapterError` if it is not one."""
    adapter_path = Path(path)
    try:
        header = read_header(adapter_path)
    except ModelError as exc:
        raise AdapterError(f"not a usable adapter: {exc}") from None
    return _lora_info(header)


def check_lora(path: str | os.PathLike[str], base: GGUFHeader) -> LoraInfo:
    """Check that an adapter fits ``base``: architecture, tensor names, shapes, finite values."""
    adapter_path = Path(path)
    try:
        header = read_header(adapter_path)
    except ModelError as exc:
        raise AdapterError(f"not a usable adapter: {exc}") from None
    info = _lora_info(header)
    if info.architecture != base.architecture:
        raise AdapterError(
            f"{adapter_path.name} was made for a {info.architecture!r} model, "
            f"but the base model is {base.architecture!r}"
        )
    for target in info.targets:
        if target not in base.tensors:
            raise AdapterError(f"{adapter_path.name}: the base model has no tensor {target!r}")
        if len(base.tensors[target].shape) != 2:
            raise AdapterError(
                f"{adapter_path.name}: {target} is not a weight matrix of the base model"
            )
        n_in, n_out = base.tensors[target].shape
        a = header.tensors[f"{target}.lora_a"].shape  # ggml order: (n_in, rank)
        b = header.tensors[f"{target}.lora_b"].shape  # ggml order: (rank, n_out)
        if a[0] != n_in or b[1] != n_out:
            raise AdapterError(
                f"{adapter_path.name}: {target} adapter maps {a[0]} -> {b[1]} but the base tensor "
                f"maps {n_in} -> {n_out} (an adapter for another model size?)"
            )
    for name in header.tensors:
        values = tensor_array(header, name) if _is_float(header, name) else None
        if values is not None and not np.isfinite(values).all():
            raise AdapterError(
                f"{adapter_path.name}: tensor {name} contains NaN or infinite values"
            )
    return info


def _is_float(header: GGUFHeader, name: str) -> bool:
    return header.tensors[name].type.name in ("F32", "F16")


def _lora_info(header: GGUFHeader) -> LoraInfo:
    path = header.path
    if header.file_type != "adapter" or header.metadata.get("adapter.type") != "lora":
        raise AdapterError(
            f"{path.name} is not a LoRA adapter (general.type={header.file_type!r}, "
            f"adapter.type={header.metadata.get('adapter.type')!r})"
        )
    names = set(header.tensors)
    targets = sorted({n.rsplit(".", 1)[0] for n in names})
    ranks = set()
    for target in targets:
        a, b = f"{target}.lora_a", f"{target}.lora_b"
        if a not in names or b not in names:
            raise AdapterError(f"{path.name}: {target} needs both .lora_a and .lora_b tensors")
        a_shape, b_shape = header.tensors[a].shape, header.tensors[b].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            raise AdapterError(
                f"{path.name}: {target} has lora_a {a_shape[::-1]} and lora_b {b_shape[::-1]} "
                "(numpy order), which do not share a rank"
            )
        ranks.add(a_shape[1])
    if not targets:
        raise AdapterError(f"{path.name} holds no LoRA tensors")
    alpha = header.metadata.get("adapter.lora.alpha")
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise AdapterError(f"{path.name}: adapter.lora.alpha is missing or not finite ({alpha!r})")
    rank = max(ranks)
    return LoraInfo(
        path=path,
        architecture=header.architecture,
        rank=rank,
        alpha=float(alpha),
        targets=tuple(targets),
        size_bytes=path.stat().st_size,
    )


def from_peft(peft: PeftAdapter, out: Path, base_model: Path, dtype: str) -> Path:
    """The GGUF adapter for the GGUF model ``base_model`` (see :func:`to_gguf`)."""
    return to_gguf(peft, out, read_header(base_model), dtype=dtype)


def inspect(path: Path) -> AdapterSummary:
    info = inspect_lora(path)
    return AdapterSummary(
        path=info.path,
        format="gguf",
        architecture=info.architecture,
        rank=info.rank,
        alpha=info.alpha,
        scale=info.alpha / info.rank if info.alpha else 1.0,
        targets=info.targets,
        size_bytes=info.size_bytes,
    )


FORMAT = AdapterFormat(
    name="gguf",
    backend="llamacpp",
    suffix=".gguf",
    dtypes=("f16", "f32"),
    title="GGUF LoRA (llama.cpp)",
    from_peft=from_peft,
    inspect=inspect,
)
