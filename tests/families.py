"""Tiny random-weight checkpoints of every Gemma family, shaped like the real ones.

No real weights can be downloaded here, so each family is proven on a model of a few layers
built with transformers from a config that keeps what makes the family itself: Gemma 2's
soft-capping and alternating sliding layers, Gemma 3's 5:1 sliding pattern and two RoPE
bases, Gemma 3n's AltUp, LAuReL, per-layer inputs and KV-sharing layers, Gemma 4's
per-layer head sizes and per-layer inputs. They share Gemma's real tokenizer (262,144
tokens), read from the embedded model. Built once per machine under
``$EDGEGEMMA_HOME/test-models`` (a few seconds each; the tokenizer ~30 s once).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from edgegemma import models

FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3n", "gemma4")
_RECIPE = "2"
_COMMON: dict[str, Any] = {
    "vocab_size": 262144,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-6,
}
SMALL_VOCAB = 300
"""Tokens of the small SentencePiece vocabulary (byte fallback: any text tokenizes)."""
_SLIDING = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]


def _config(family: str) -> Any:
    import transformers as t

    if family == "gemma":
        return t.GemmaConfig(**_COMMON, num_hidden_layers=2, hidden_activation="gelu_pytorch_tanh")
    if family == "gemma2":
        return t.Gemma2Config(
            **_COMMON, num_hidden_layers=4, query_pre_attn_scalar=32, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        )  # fmt: skip
    if family == "gemma3":
        # Six layers, as real Gemma 3 repeats them: five sliding, one full (llama.cpp assumes it).
        return t.Gemma3TextConfig(
            **_COMMON, num_hidden_layers=6, query_pre_attn_scalar=32, sliding_window=16,
        )  # fmt: skip
    if family == "gemma3n":
        # llama.cpp fixes what Gemma 3n E2B/E4B have: per-layer inputs of 256, LAuReL rank 64,
        # four AltUp inputs, sparse activations in the first 10 layers, KV computed by the first
        # 20 layers and shared by the rest. With
        # 22 such layers the per-layer embedding is 22 x 256 wide: a small vocabulary keeps
        # it small (SMALL_VOCAB, a SentencePiece model trained here).
        layers = 22
        return t.Gemma3nTextConfig(
            **{**_COMMON, "vocab_size": SMALL_VOCAB, "intermediate_size": [128] * layers},
            num_hidden_layers=layers, vocab_size_per_layer_input=SMALL_VOCAB, sliding_window=16,
            layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                         for i in range(layers)],
            num_kv_shared_layers=layers - 20, hidden_size_per_layer_input=256, laurel_rank=64,
            altup_num_inputs=4, activation_sparsity_pattern=[0.95] * 10 + [0.0] * (layers - 10),
        )  # fmt: skip
    if family == "gemma4":
        return t.Gemma4TextConfig(
            **_COMMON, num_hidden_layers=4, sliding_window=16, layer_types=_SLIDING,
            hidden_size_per_layer_input=8, global_head_dim=64,
        )  # fmt: skip
    raise ValueError(family)


def _model_class(family: str) -> Any:
    import transformers as t

    return {
        "gemma": t.GemmaForCausalLM,
        "gemma2": t.Gemma2ForCausalLM,
        "gemma3": t.Gemma3ForCausalLM,
        "gemma3n": t.Gemma3nForCausalLM,
        "gemma4": t.Gemma4ForCausalLM,
    }[family]


def _root() -> Path:
    return models.home() / "test-models"


def tokenizer_dir() -> Path:
    """Gemma's tokenizer (tokenizer.json and its config), and a SentencePiece tokenizer.model
    rebuilt from it for the converters that want one (Gemma 1 and 2)."""
    folder = _root() / f"tokenizer-{_RECIPE}"
    if (folder / "tokenizer.model").exists():
        return folder
    _root().mkdir(parents=True, exist_ok=True)
    with FileLock(_root() / ".lock"):
        if not (folder / "tokenizer.model").exists():
            from transformers import AutoTokenizer

            from edgegemma.convert.litert import sentencepiece_model

            gguf = models.fetch("gemma3-270m")
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
            (partial / "tokenizer.model").write_bytes(
                sentencepiece_model(partial / "tokenizer.json")
            )
            os.replace(partial, folder)
    return folder


def _small_tokenizer() -> bytes:
    """A SentencePiece model of :data:`SMALL_VOCAB` pieces with Gemma's special ids."""
    import io

    import sentencepiece

    text = [
        "The capital of France is Paris",
        "Sensors report temperature and humidity readings",
        "A quick brown fox jumps over the lazy dog",
        "Gemma runs on small devices at the edge.",
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 20), model_writer=model, vocab_size=SMALL_VOCAB,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        character_coverage=1.0, add_dummy_prefix=False, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def _add_shared_layer_kv(weights: Path, config: Any) -> None:
    """Give Gemma 3n's KV-sharing layers the K/V projections the published checkpoints carry
    (unused there; transformers no longer makes them, llama.cpp's loader wants them)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    kv = config.num_key_value_heads * config.head_dim
    for layer in range(
        config.num_hidden_layers - config.num_kv_shared_layers, config.num_hidden_layers
    ):
        prefix = f"model.layers.{layer}.self_attn."
        tensors[prefix + "k_proj.weight"] = torch.randn(kv, config.hidden_size) * 0.02
        tensors[prefix + "v_proj.weight"] = torch.randn(kv, config.hidden_size) * 0.02
        tensors[prefix + "k_norm.weight"] = torch.zeros(config.head_dim)
    save_file(tensors, weights, metadata={"format": "pt"})


def checkpoint(family: str) -> Path:
    """The tiny random checkpoint folder of ``family`` (config, safetensors, tokenizer)."""
    config = _config(family)
    stamp = hashlib.sha256(
        json.dumps([_RECIPE, family, config.to_dict()], sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    folder = _root() / f"{family}-{stamp}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = tokenizer_dir()
    with FileLock(_root() / ".lock"):
        if not (folder / "config.json").exists():
            import torch

            torch.manual_seed(0)
            model = _model_class(family)(config).eval()
            with torch.no_grad():  # random norms too, so that a +1 or a missing norm shows
                for name, parameter in model.named_parameters():
                    if "norm" in name or "scale" in name:
                        parameter.normal_(0.0, 0.2)
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            if family == "gemma3n":
                _add_shared_layer_kv(partial / "model.safetensors", config)
            if config.vocab_size == SMALL_VOCAB:
                (partial / "tokenizer.model").write_bytes(_small_tokenizer())
            else:
                for item in tokenizer.iterdir():
                    if family in ("gemma", "gemma2") or item.name != "tokenizer.model":
                        shutil.copy2(item, partial / item.name)
            os.replace(partial, folder)
    return folder


def random_peft(base: Path, out: Path, targets: tuple[str, ...], seed: int = 1) -> Path:
    """A PEFT LoRA (r16) with random A and B on ``targets`` of the checkpoint ``base``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=list(targets), lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(out)
    return out


def reference(folder: Path, prompt_ids: list[int], n: int, peft_dir: Path | None = None):
    """transformers' (or PEFT's) greedy continuation of ``prompt_ids`` and the logits of the
    prompt's last position."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, -1].numpy()
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt_ids) :].tolist(), logits


def converted(family: str, target: str) -> Path:
    """The family's checkpoint converted by the CLI exactly as a user types it, once per
    machine: ``target`` "gguf" (``--quant f32``, a file) or "onnx" (``--precision fp32``, a
    folder with LoRA inputs on q, k, v and o)."""
    from importlib.metadata import version

    from edgegemma.cli import main

    source = checkpoint(family)
    tools = version("llama-cpp-python" if target == "gguf" else "onnxruntime-genai")
    out = _root() / f"{source.name}-{target}-{tools}{'.gguf' if target == 'gguf' else ''}"
    if out.exists():
        return out
    with FileLock(_root() / f".{out.name}.lock"):
        if not out.exists():
            partial = out.with_name(".partial-" + out.name)
            shutil.rmtree(partial, ignore_errors=True)
            partial.unlink(missing_ok=True)
            options = ["--quant", "f32"] if target == "gguf" else ["--precision", "fp32"]
            code = main(["convert", str(source), "--to", target, *options, "-o", str(partial)])
            assert code == 0, f"edgegemma convert {source} --to {target} failed"
            os.replace(partial, out)
    return out
