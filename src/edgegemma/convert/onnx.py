"""Float HF checkpoint -> ONNX Runtime GenAI model folder, with LoRA matrices as graph inputs.

The ONNX Runtime GenAI builder bakes a PEFT adapter into the graph as MatMul initializers.
We build with a placeholder adapter on the chosen target modules and then turn its A/B
initializers into graph inputs whose rank dimension is symbolic and whose default is an
empty (rank 0) tensor: without an adapter the LoRA branch adds exactly zero, so the model
is the base model; an ``.onnx_adapter`` file supplies real matrices per generator. For int4
and int8 the LoRA MatMuls are kept out of weight quantization (an input cannot be
quantized ahead of time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters.onnx import LoraInput, write_lora_inputs
from ..adapters.peft import write_peft
from ..builds import Progress
from ..errors import ConversionError
from ..families import family_of_checkpoint
from .checkpoint import build_from_source

KIND = "onnx"

_RECIPE = "3"
_TOOLS = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers", "torch", "peft")
_PLACEHOLDER_RANK = 4
_ATTENTION = ("q", "k", "v", "o")


def build_onnx(source: Path, options: dict[str, str], *, progress: Progress | None = None) -> Path:
    """The ONNX Runtime GenAI folder for ``source`` (a GGUF or a Hugging Face checkpoint
    folder) built with :func:`~edgegemma.recipes.onnx_options`, cached."""
    return build_from_source(
        KIND, source, options, recipe=_RECIPE, tools=_TOOLS, build=_build, progress=progress
    )


def _build(checkpoint: Path, out: Path, options: Mapping[str, str], say: Progress) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    targets = options["lora_targets"].split(",") if options["lora_targets"] != "none" else []
    modules = _lora_modules(config, targets)
    precision = options["precision"]
    with tempfile.TemporaryDirectory(prefix="edgegemma-onnx-") as scratch_dir:
        scratch = Path(scratch_dir)
        # Logits of the last position only: the engine samples nothing else, and the
        # vocabulary-wide LM head over every prompt token makes prefill several times slower
        # and its memory grow with the prompt.
        extra = ["prune_lm_head=true"]
        if options["quant_method"] == "k_quant":
            extra.append("algo_config=k_quant")
        if modules:
            write_peft(
                scratch / "placeholder", _placeholder_weights(modules), alpha=_PLACEHOLDER_RANK
            )
            extra.append(f"adapter_path={scratch / 'placeholder'}")
            if precision != "fp32":
                excluded = [f"/{_graph_path(m)}/lora_{ab}/MatMul" for m in modules for ab in "AB"]
                extra.append(f"nodes_to_exclude={','.join(excluded)}")
        say(f"building the {precision} ONNX model")
        _run_builder(checkpoint, out, precision, extra, scratch)
        if modules:
            say("turning the LoRA matrices into graph inputs")
            _expose_lora_inputs(out, modules)


def _run_builder(
    checkpoint: Path, out: Path, precision: str, extra: list[str], scratch: Path
) -> None:
    from onnxruntime_genai.models import builder

    log_path = scratch / "builder.log"
    quantizer_log = logging.getLogger("onnxruntime.quantization")
    quiet = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # one INFO line per MatMul otherwise, on the console
    with (
        open(log_path, "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        try:
            family = family_of_checkpoint(checkpoint).name  # the builder's name for it
            options = builder.parse_extra_options(
                family,
                str(checkpoint),
                str(out),
                precision,
                "cpu",
                str(scratch / "hf-cache"),
                extra,
            )
            _fix_rope_config(options["hf_details"]["hf_config"])
            builder.create_model(
                family,
                str(checkpoint),
                str(out),
                precision,
                "cpu",
                str(scratch / "hf-cache"),
                **options,
            )
        except Exception as exc:
            log.flush()
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise ConversionError(f"the ONNX Runtime GenAI builder failed: {exc}\n{tail}") from exc
        finally:
            quantizer_log.setLevel(quiet)


def _fix_rope_config(config: Any) -> None:  # a transformers config, read as it is at run time
    """Give the builder the flat RoPE fields it expects.

    transformers 5 keeps Gemma 3's RoPE per attention type in a nested ``rope_parameters``;
    the builder (0.18) reads a flat ``rope_parameters["rope_type"]`` and the sliding layers'
    base from ``rope_local_base_freq`` (KeyError 'rope_type' otherwise).
    """
    nested = getattr(config, "rope_parameters", None)
    if not (isinstance(nested, dict) and "full_attention" in nested):
        return
    full, local = nested["full_attention"], nested["sliding_attention"]
    if (
        full.get("rope_type", "default") != "default"
        or local.get("rope_type", "default") != "default"
    ):
        raise ConversionError(f"unsupported RoPE scaling for the ONNX builder: {nested}")
    config.rope_parameters = {"rope_type": "default", "rope_theta": full["rope_theta"]}
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = local["rope_theta"]


def _lora_modules(config: dict, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """HF module name -> (n_in, n_out) of every adapted layer."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {
        "q": (hidden, q),
        "k": (hidden, kv),
        "v": (hidden, kv),
        "o": (q, hidden),
        "gate": (hidden, ffn),
        "up": (hidden, ffn),
        "down": (ffn, hidden),
    }
    modules = {}
    for layer in range(config["num_hidden_layers"]):
        for target in targets:
            block = "self_attn" if target in _ATTENTION else "mlp"
            modules[f"model.layers.{layer}.{block}.{target}_proj"] = shapes[target]
    return modules


def _graph_path(module: str) -> str:
    """The builder's name for an HF module: model.layers.0.self_attn.q_proj -> model/layers.0/attn/q_proj."""
    _, _, layer, block, proj = module.split(".")
    return f"model/layers.{layer}/{'attn' if block == 'self_attn' else 'mlp'}/{proj}"


def _input_names(module: str) -> tuple[str, str]:
    prefix = _graph_path(module).replace("/", ".")
    return f"{prefix}.lora_A.MatMul.weight", f"{prefix}.lora_B.MatMul.weight"


def _placeholder_weights(
    modules: dict[str, tuple[int, int]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Non-zero and distinct, so that no graph optimization can fold or merge them.
    rng = np.random.default_rng(0)
    return {
        module: (
            rng.normal(0, 0.01, (_PLACEHOLDER_RANK, n_in)).astype(np.float32),
            rng.normal(0, 0.01, (n_out, _PLACEHOLDER_RANK)).astype(np.float32),
        )
        for module, (n_in, n_out) in modules.items()
    }


def _expose_lora_inputs(folder: Path, modules: dict[str, tuple[int, int]]) -> None:
    import onnx_ir as ir

    model_path = folder / "model.onnx"
    model = ir.load(model_path)
    graph = model.graph
    record: dict[str, LoraInput] = {}
    for module, (n_in, n_out) in modules.items():
        a_name, b_name = _input_names(module)
        # One rank name per layer: ONNX Runtime holds every use of a dim name to one size,
        # and an adapter may leave some layers at the default rank 0.
        rank = f"lora_rank_{_graph_path(module).replace('/', '_')}"
        for name, shape in ((a_name, (n_in, 0)), (b_name, (0, n_out))):
            value = graph.initializers.get(name)
            if value is None:
                raise ConversionError(f"the builder made no LoRA weight {name!r}")
            symbolic = [rank if d == 0 else d for d in shape]
            value.const_value = ir.tensor(np.zeros(shape, dtype=np.float32), name=name)
            value.shape = ir.Shape(symbolic)
            graph.inputs.append(value)
            for use in value.uses():
                for output in use.node.outputs:  # the builder fixed the placeholder's rank here
                    output.shape = None
        record[module] = LoraInput(a_name, b_name, n_in, n_out)
    # `model` still reads its weights lazily from the builder's files: write beside them first.
    rewritten = folder / "rewritten"
    rewritten.mkdir()
    ir.save(model, rewritten / "model.onnx", external_data="model.onnx.data")
    for name in ("model.onnx", "model.onnx.data"):
        os.replace(rewritten / name, folder / name)
    rewritten.rmdir()
    write_lora_inputs(folder, record)
