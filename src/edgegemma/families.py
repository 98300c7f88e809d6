"""The Gemma families edgegemma runs, and what each backend, converter and tool does for each.

One :class:`Family` per architecture, keyed by the name llama.cpp writes to a GGUF's
``general.architecture`` (``gemma``, ``gemma2``, ``gemma3``, ``gemma3n``, ``gemma4``).
Each names the Hugging Face ``model_type`` values that are it, and for every *capability*
(running on a backend, converting to a format, an adapter format, training, a built-in chat
template) either the test that proves it against transformers or the reason it is refused.

Everything that reads a model checks here first (:func:`require`): what a runtime cannot do
for an architecture is refused before any work starts, with an
:class:`~edgegemma.errors.UnsupportedArchitectureError` naming the architecture, the
capability and why -- never a library's own message halfway through. A "yes" is earned
per family: the evidence names a test on a tiny model of that family (tests/families.py),
never another family's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError, UnsupportedArchitectureError

CAPABILITIES = (
    "backend:llamacpp",
    "backend:onnx",
    "backend:mediapipe",
    "convert:gguf",
    "convert:onnx",
    "convert:litert",
    "adapter:gguf",
    "adapter:onnx",
    "adapter:litert",
    "train",
    "chat-template",
)
"""What a family may support: ``backend:NAME`` runs on that backend, ``convert:FORMAT``
builds that format from a checkpoint or GGUF, ``adapter:FORMAT`` converts a PEFT adapter
for it, ``train`` fine-tunes a LoRA, ``chat-template`` has a built-in template for model
files that carry none."""


@dataclass(frozen=True)
class Family:
    """One architecture and what edgegemma does with it."""

    name: str
    """llama.cpp's architecture name (GGUF ``general.architecture``): the registry key."""
    title: str
    model_types: tuple[str, ...]
    """Hugging Face ``config.json`` ``model_type`` values of this family."""
    supported: Mapping[str, str] = field(default_factory=dict)
    """Capability -> the test that proves it (tests/FILE::NAME)."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Capability -> why edgegemma refuses it."""

    def __post_init__(self) -> None:
        both = set(self.supported) & set(self.refused)
        unknown = (set(self.supported) | set(self.refused)) - set(CAPABILITIES)
        missing = set(CAPABILITIES) - set(self.supported) - set(self.refused)
        if both or unknown or missing:
            raise ValueError(f"family {self.name}: {both=} {unknown=} {missing=}")

    def supports(self, capability: str) -> bool:
        return capability in self.supported


_REFERENCE = "tests/test_families.py::test_{}_matches_transformers[{}]"
_ADAPTER = "tests/test_families.py::test_peft_lora_matches_peft[{}-{}]"
_ENGINE = "tests/test_families.py::test_engine_features_run[{}]"

_ONNX_BUILDER_GEMMA4 = (
    "onnxruntime-genai 0.18's builder takes Gemma 4 only as the multimodal "
    "Gemma4ForConditionalGeneration checkpoint, which edgegemma does not build from"
)
_ONNX_BUILDER_GEMMA3N = "onnxruntime-genai 0.18's builder has no Gemma 3n model"
_LITERT_ONLY_GEMMA3 = (
    "edgegemma's LiteRT-LM build goes through litert-torch's Gemma 3 decoder, which has no "
    "{} layers"
)


def _llamacpp(name: str) -> dict[str, str]:
    """The capabilities proven on llama.cpp for ``name`` by the family tests."""
    return {
        "backend:llamacpp": _REFERENCE.format("gguf", name),
        "convert:gguf": _REFERENCE.format("gguf", name),
        "adapter:gguf": _ADAPTER.format(name, "qv"),
        "train": _TRAIN.format(name),
    }


_TRAIN = "tests/test_families.py::test_train_matches_peft[{}]"


def _onnx(name: str) -> dict[str, str]:
    """The capabilities proven on ONNX Runtime GenAI for ``name`` by the family tests."""
    return {
        "backend:onnx": _ONNX_REFERENCE.format(name),
        "convert:onnx": _ONNX_REFERENCE.format(name),
        "adapter:onnx": _ONNX_ADAPTER.format(name),
    }


_ONNX_REFERENCE = "tests/test_families.py::test_onnx_matches_transformers[{}]"
_ONNX_ADAPTER = "tests/test_families.py::test_onnx_lora_matches_peft[{}]"


def _litert_refused(layers: str) -> dict[str, str]:
    return {
        "backend:mediapipe": _LITERT_ONLY_GEMMA3.format(layers),
        "convert:litert": _LITERT_ONLY_GEMMA3.format(layers),
        "adapter:litert": _LITERT_ONLY_GEMMA3.format(layers),
    }


def _onnx_refused(reason: str) -> dict[str, str]:
    return {capability: reason for capability in ("backend:onnx", "convert:onnx", "adapter:onnx")}


_GEMMA3_TEMPLATE = "tests/test_families.py::test_engine_features_run[{}]"

FAMILIES: Mapping[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="gemma",
            title="Gemma (1)",
            model_types=("gemma",),
            supported={
                **_llamacpp("gemma"),
                **_onnx("gemma"),
                "chat-template": _GEMMA3_TEMPLATE.format("gemma"),
            },
            refused=_litert_refused("Gemma 1 (GeGLU, no sliding window)"),
        ),
        Family(
            name="gemma2",
            title="Gemma 2",
            model_types=("gemma2",),
            supported={
                **_llamacpp("gemma2"),
                **_onnx("gemma2"),
                "chat-template": _GEMMA3_TEMPLATE.format("gemma2"),
            },
            refused=_litert_refused("Gemma 2 (logit soft-capping)"),
        ),
        Family(
            name="gemma3",
            title="Gemma 3 (text)",
            model_types=("gemma3_text", "gemma3"),
            supported={
                **_llamacpp("gemma3"),
                **_onnx("gemma3"),
                "backend:mediapipe": "tests/test_mediapipe.py",
                "convert:litert": "tests/test_mediapipe.py",
                "adapter:litert": "tests/test_mediapipe.py",
                "chat-template": "tests/test_chat.py",
            },
        ),
        Family(
            name="gemma3n",
            title="Gemma 3n",
            model_types=("gemma3n", "gemma3n_text"),
            supported={
                **_llamacpp("gemma3n"),
                "chat-template": _GEMMA3_TEMPLATE.format("gemma3n"),
            },
            refused={
                **_onnx_refused(_ONNX_BUILDER_GEMMA3N),
                **_litert_refused("Gemma 3n (AltUp, per-layer inputs)"),
            },
        ),
        Family(
            name="gemma4",
            title="Gemma 4 (text)",
            model_types=("gemma4", "gemma4_text"),
            supported=_llamacpp("gemma4"),
            refused={
                **_onnx_refused(_ONNX_BUILDER_GEMMA4),
                **_litert_refused("Gemma 4 (per-layer head sizes and inputs)"),
                "chat-template": "Gemma 4 chats in its own turn format, and no template of it "
                "ships with edgegemma: use a model file that carries its chat template",
            },
        ),
    )
}
"""Every family edgegemma knows, by llama.cpp architecture name."""


def _prefix(where: object) -> str:
    return f"{where}: " if where else ""


def family(name: str, where: object = "") -> Family:
    """The family of the llama.cpp architecture ``name`` (of the model ``where``, named in
    errors); refused if it is not a Gemma."""
    found = FAMILIES.get(name)
    if found is None:
        raise UnsupportedArchitectureError(
            f"{_prefix(where)}{name!r} is not a Gemma architecture edgegemma knows "
            f"(known: {', '.join(FAMILIES)})",
            architecture=name,
            capability=None,
        )
    return found


def family_of_model_type(model_type: str, where: object = "") -> Family:
    """The family whose Hugging Face ``model_type`` is ``model_type``."""
    for candidate in FAMILIES.values():
        if model_type in candidate.model_types:
            return candidate
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"{_prefix(where)}model_type {model_type!r} is not a Gemma family edgegemma knows "
        f"(known: {known})",
        architecture=model_type,
        capability=None,
    )


def family_of_checkpoint(folder: str | os.PathLike[str]) -> Family:
    """The family of a Hugging Face checkpoint folder, from its ``config.json``."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{folder} has no config.json: not a Hugging Face checkpoint folder"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {config_path}: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ModelError(f"{config_path} names no model_type")
    return family_of_model_type(model_type, folder)


def require(architecture: str, capability: str, where: object = "") -> Family:
    """The family of ``architecture`` if it supports ``capability``; else the refusal, which
    names the model ``where`` too."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    found = family(architecture, where)
    if not found.supports(capability):
        what = capability.replace(":", " ")
        raise UnsupportedArchitectureError(
            f"{_prefix(where)}{found.name} ({found.title}): {what} is not supported: "
            f"{found.refused[capability]}",
            architecture=found.name,
            capability=capability,
        )
    return found
