"""GGUF -> float Hugging Face checkpoint: the common source of every other format.

transformers dequantizes the GGUF (and undoes Gemma's +1 on the norm weights) when it loads
it with ``gguf_file=``; such a model refuses ``save_pretrained``, so its weights are moved
into a plain model of the same config first. Needs the ``convert`` extra (torch,
transformers, gguf); takes ~1.5 min and ~3.3 GB of memory for Gemma 3 270M.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..builds import Progress, cached_build, sha256_file, tool_versions
from ..errors import ConversionError

KIND = "checkpoint"
_RECIPE = "1"
"""Bump when the conversion below changes what it writes."""
_TOOLS = ("transformers", "torch", "gguf", "tokenizers", "safetensors")


def float_checkpoint(gguf_path: Path, *, progress: Progress | None = None) -> Path:
    """The float32 HF checkpoint folder (config, safetensors, tokenizer) of ``gguf_path``."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    key = {"source_sha256": sha256_file(gguf_path), "recipe": _RECIPE, **tool_versions(*_TOOLS)}
    return cached_build(
        KIND, key, lambda out: _convert(gguf_path, out, progress), progress=progress
    )


def _convert(gguf_path: Path, out: Path, progress: Progress | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda _message: None)
    folder, name = gguf_path.parent, gguf_path.name
    say(f"reading the tokenizer from {name}")
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    say(f"dequantizing the weights of {name}")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if getattr(config, "model_type", None) != "gemma3_text":
        raise ConversionError(f"{name} is a {config.model_type!r} model; only Gemma 3 is supported")
    # save_pretrained refuses a model that remembers it came from a quantized GGUF.
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    say("writing the float checkpoint")
    plain.save_pretrained(out)


def build_from_gguf(
    kind: str,
    gguf_path: Path,
    options: Mapping[str, str],
    *,
    recipe: str,
    tools: tuple[str, ...],
    build: Callable[[Path, Path, Mapping[str, str], Progress], None],
    progress: Progress | None = None,
) -> Path:
    """A cached ``kind`` build of ``gguf_path``: ``build(checkpoint, out, options, say)`` fills
    ``out``.

    The key is the GGUF's sha256, the options, the recipe version and the tools' versions, so
    any of them changing makes a new build and nothing else does.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    key = {
        "source_sha256": sha256_file(gguf_path),
        **options,
        "recipe": recipe,
        **tool_versions(*tools),
    }
    return cached_build(
        kind,
        key,
        lambda out: build(
            float_checkpoint(gguf_path, progress=progress),
            out,
            options,
            progress or (lambda _message: None),
        ),
        progress=progress,
    )
