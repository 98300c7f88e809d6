"""GGUF -> float Hugging Face checkpoint: the common source of every other format.

transformers dequantizes the GGUF (and undoes Gemma's +1 on the norm weights) when it loads
it with ``gguf_file=``; such a model refuses ``save_pretrained``, so its weights are moved
into a plain model of the same config first. Needs the ``convert`` extra (torch,
transformers, gguf); its time and memory are in docs/onnx.md and docs/mediapipe.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..builds import Progress, cached_build, tool_versions, tree_sha256
from ..errors import ConversionError, UnsupportedArchitectureError
from ..files import sha256_file
from ..gguffile import read_header

KIND = "checkpoint"
_RECIPE = "1"
"""Bump when the conversion below changes what it writes."""
_TOOLS = ("transformers", "torch", "gguf", "tokenizers", "safetensors")


def float_checkpoint(gguf_path: Path, *, progress: Progress | None = None) -> Path:
    """The float32 HF checkpoint folder (config, safetensors, tokenizer) of ``gguf_path``."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    architecture = read_header(gguf_path).architecture
    if architecture != "gemma3":
        raise UnsupportedArchitectureError(
            f"{gguf_path.name}: a {architecture} GGUF cannot be turned back into a float "
            "checkpoint here (transformers' GGUF reader is verified for gemma3 only): convert "
            f"from the {architecture} model's Hugging Face checkpoint folder instead",
            architecture=architecture,
            capability=None,
        )
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
    # save_pretrained refuses a model that remembers it came from a quantized GGUF.
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    say("writing the float checkpoint")
    plain.save_pretrained(out)


def build_from_source(
    kind: str,
    source: Path,
    options: Mapping[str, str],
    *,
    recipe: str,
    tools: tuple[str, ...],
    build: Callable[[Path, Path, Mapping[str, str], Progress], None],
    progress: Progress | None = None,
) -> Path:
    """A cached ``kind`` build of ``source``, a GGUF (its float checkpoint is made first) or a
    Hugging Face checkpoint folder: ``build(checkpoint, out, options, say)`` fills ``out``.

    The key is the source's sha256 (a folder's: over its files), the options, the recipe
    version and the tools' versions, so any of them changing makes a new build and nothing
    else does.
    """
    source = Path(source)
    if source.is_dir():
        digest = checkpoint_sha256(source)
    elif source.is_file():
        digest = sha256_file(source)
    else:
        raise ConversionError(f"model not found: {source}")
    key = {"source_sha256": digest, **options, "recipe": recipe, **tool_versions(*tools)}

    def run(out: Path) -> None:
        checkpoint = source if source.is_dir() else float_checkpoint(source, progress=progress)
        build(checkpoint, out, options, progress or (lambda _message: None))

    return cached_build(kind, key, run, progress=progress)


def checkpoint_sha256(folder: Path) -> str:
    """One sha256 of a checkpoint folder's files (names, sizes and contents)."""
    files = {
        path.relative_to(folder).as_posix(): {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    if "config.json" not in files:
        raise ConversionError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    return tree_sha256(files)
