"""Importance-weighted requantization of the layers: the measurements behind docs/models.md's
"Importance weights for the layers do not close the gap either".

    python benchmarks/layer_importance.py [--llama-bench PATH] [--rounds 2] [--json out.json]

1. E[x^2] of every linear layer's input, per column, over the same calibration text as the
   shipped embedding weights (``edgegemma.convert.importance.calibration_texts``: the pinned
   model samples 192 tokens after each of 16 openings), read by forward hooks on the pinned
   model dequantized to float32 in PyTorch (``edgegemma.convert.checkpoint``).
2. Variants of the default model (its importance-weighted IQ4_NL embedding kept) with layers
   requantized to IQ4_NL by ggml's own quantizer given those weights: the Q5_0 tensors only,
   and every linear layer. Written with gguf-py's writer, since the types change size.
3. Each file's perplexity on the shipped text (windows of 1024; the change against the pinned
   file's) and, with ``--llama-bench``,
   the prefill of a 31-token prompt (a sensor prompt's length; 2 threads, median of 8), the
   files alternated round after round so that a drifting machine hits them alike. The pinned
   file and ``gemma3-270m-q4_0`` (every tensor Q4_0) are measured beside them.

Needs PyTorch and transformers (the test dependencies); ~5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Hugging Face's module names of Gemma 3's linear layers -> GGUF's.
LINEAR = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip
VARIANTS: dict[str, Callable[[str, str], bool]] = {
    "the Q5_0 tensors to weighted IQ4_NL": lambda _name, kind: kind == "Q5_0",
    "every linear layer to weighted IQ4_NL": lambda _name, _kind: True,
}
"""Which linear layers each variant requantizes, by GGUF tensor name and stored type."""


def layer_importance(pinned: Path) -> dict[str, np.ndarray]:
    """E[x_j^2] of each linear layer's input over the calibration text, by GGUF tensor name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgegemma.convert.checkpoint import float_checkpoint
    from edgegemma.convert.importance import calibration_texts

    texts = calibration_texts(pinned)
    folder = float_checkpoint(pinned)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: object, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            squares[name] = squares.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for module_name, module in model.named_modules():
        found = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module_name)
        if found and found.group(2) in LINEAR:
            tensor = f"blk.{found.group(1)}.{LINEAR[found.group(2)]}.weight"
            module.register_forward_pre_hook(hook(tensor))
    with torch.no_grad():
        for text in texts:
            model(tokenizer(text, return_tensors="pt").input_ids)
    return {name: (squares[name] / counts[name]).float().numpy() for name in squares}


def write_variant(
    default: Path, out: Path, weights: dict[str, np.ndarray], chosen: Callable[[str, str], bool]
) -> int:
    """``default`` with the chosen linear layers requantized to IQ4_NL; how many were."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    from edgegemma.quantize import quantize_rows

    source = GGUFReader(default)
    writer = GGUFWriter(out, arch=source.fields["general.architecture"].contents())
    for name, field in source.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        kind = field.types[0]
        sub_kind = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_kind)
    changed = 0
    for tensor in source.tensors:
        data, kind = tensor.data, tensor.tensor_type
        if tensor.name in weights and chosen(tensor.name, kind.name):
            values = dequantize(data, kind)
            kind = GGMLQuantizationType.IQ4_NL
            data = quantize_rows(values, kind, weights[tensor.name])
            changed += 1
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return changed


def perplexity(model: Path) -> float:
    from importlib import resources

    import edgegemma

    text = resources.files("edgegemma").joinpath("data/heldout-en.txt").read_text("utf-8")
    with edgegemma.load(model, n_ctx=1024) as engine:
        return engine.perplexity(text, window=1024).perplexity


def prefill_ms(llama_bench: str, model: Path) -> float:
    """Median milliseconds of ``llama-bench -p 31`` over 8 repetitions, 2 threads."""
    done = subprocess.run(
        [llama_bench, "-m", str(model), "-p", "31", "-n", "0", "-r", "8", "-t", "2", "-o", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return statistics.median(json.loads(done.stdout)[0]["samples_ns"]) / 1e6


def main() -> None:
    from edgegemma import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench, for the prefill column")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    pinned, default = models.fetch("gemma3-270m"), models.fetch("gemma3-270m-embed-iq4_nl")
    weights = layer_importance(pinned)
    with tempfile.TemporaryDirectory(prefix="edgegemma-layers-") as scratch:
        files = {
            "gemma3-270m (pinned)": pinned,
            "layers as pinned (the default)": default,
            "gemma3-270m-q4_0 (everything Q4_0)": models.fetch("gemma3-270m-q4_0"),
        }
        for index, (label, chosen) in enumerate(VARIANTS.items()):
            files[label] = Path(scratch) / f"variant{index}.gguf"
            count = write_variant(default, files[label], weights, chosen)
            print(f"{label}: {count} tensors requantized", flush=True)
        rows = {label: {"perplexity": perplexity(path)} for label, path in files.items()}
        for _ in range(args.rounds if args.llama_bench else 0):
            for label, path in files.items():
                rows[label].setdefault("prefill_31_ms", []).append(
                    prefill_ms(args.llama_bench, path)
                )
    base = rows["gemma3-270m (pinned)"]["perplexity"]
    for label, row in rows.items():
        rounds = " / ".join(f"{ms:.0f}" for ms in row.get("prefill_31_ms", []))
        change = 100 * (row["perplexity"] / base - 1)
        print(f"{label:40} perplexity {row['perplexity']:.2f} ({change:+.1f} %)  "
              f"31-token prefill ms by round: {rounds or '-'}")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
