"""Float HF checkpoint -> LiteRT-LM: a ``.litertlm`` and a MediaPipe ``.task`` bundle.

One build makes both bundles from one TFLite graph:

1. litert-torch's Gemma 3 decoder (its generative API) loads the float checkpoint and is
   exported with one ``prefill_<n>`` and one ``decode`` signature. With a LoRA rank, both
   signatures take the LoRA matrices of every attention projection as extra inputs
   (:mod:`edgegemma.adapters.litert`): LiteRT-LM runs LoRA only from a model's main signatures,
   and litert-torch's own ``--lora_ranks`` adds separate ``*_lora_r16`` signatures, which it
   mishandles, while its Gemma 3 decoder takes no LoRA argument at all -- hence
   :class:`_LoraDecoder`. The export runs in a child process (its cost: docs/mediapipe.md):
   litert-torch imports ``tensorflow.lite.python.schema_py_generated`` without depending on
   TensorFlow, and the child provides that module from ``ai_edge_litert`` for the moment of
   the import, without a fake ``tensorflow`` staying visible to other libraries.
2. A SentencePiece model is rebuilt from ``tokenizer.json`` (the GGUF carries no
   ``tokenizer.model``): same pieces and ids, BPE scores from the ids, byte fallback. It gives
   the Hugging Face tokenizer's ids (checked in the tests) and loads at a fraction of the
   time and memory ``tokenizer.json`` costs LiteRT-LM at every start (docs/mediapipe.md).
3. ``model.litertlm`` is written with litert-lm-builder, ``model.task`` with MediaPipe's
   bundler (``mediapipe==0.10.35``, the last version that ships it), both with ``<bos>`` as
   start token and ``<eos>``/``<end_of_turn>`` as stop tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..builds import Progress
from ..chat import folder_template
from ..errors import ConversionError
from ..recipes import LITERT_FILES, LITERT_PREFILL_LENGTH, LITERT_QUANTS
from .checkpoint import build_from_source

KIND = "litert"
START_TOKEN = "<bos>"
STOP_TOKENS = ("<eos>", "<end_of_turn>")

_RECIPE = "1"
"""Bump when the build below changes what it writes."""
_TOOLS = (
    "litert-torch",
    "ai-edge-litert",
    "torch",
    "litert-lm-builder",
    "mediapipe",
    "sentencepiece",
)
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def build_litert(
    source: Path, options: dict[str, str], *, progress: Progress | None = None
) -> Path:
    """The build folder (``model.litertlm``, ``model.task``) of ``source`` (a GGUF or a
    Hugging Face checkpoint folder) with ``options``."""
    return build_from_source(
        KIND, source, options, recipe=_RECIPE, tools=_TOOLS, build=_build, progress=progress
    )


def _build(checkpoint: Path, out: Path, options: Mapping[str, str], say: Progress) -> None:
    context = int(options["context"])
    with tempfile.TemporaryDirectory(prefix="edgegemma-litert-") as scratch_dir:
        scratch = Path(scratch_dir)
        tflite = scratch / "model.tflite"
        say(
            f"exporting the TFLite graph ({options['quant']}, LoRA rank {options['lora_rank']}); ~3 min, ~6 GB"
        )
        _export(checkpoint, tflite, options, say)
        say("rebuilding the SentencePiece tokenizer from tokenizer.json")
        spm = scratch / "tokenizer.spm"
        spm.write_bytes(sentencepiece_model(checkpoint / "tokenizer.json"))
        say("bundling model.litertlm")
        _write_litertlm(
            tflite,
            spm,
            out / LITERT_FILES["litertlm"],
            context,
            folder_template(checkpoint),
            scratch,
        )
        say("bundling model.task")
        _write_task(tflite, spm, out / LITERT_FILES["task"])


def sentencepiece_model(tokenizer_json: Path) -> bytes:
    """A serialized SentencePiece model with the pieces and ids of a Gemma ``tokenizer.json``.

    Settings that make its ids equal the Hugging Face tokenizer's: no normalization but
    spaces written as ``▁``, no dummy prefix, BPE with each piece's score its negative id,
    added tokens as user-defined pieces (parsed in text, as Hugging Face does), ``<0xNN>`` as
    byte pieces for byte fallback.
    """
    from sentencepiece import sentencepiece_model_pb2  # generated protobuf code: no types

    sp: Any = sentencepiece_model_pb2

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ConversionError(
            f"{tokenizer_json} is not a SentencePiece-style BPE tokenizer with byte fallback"
        )
    vocab: dict[str, int] = model["vocab"]
    added = {token["content"] for token in data.get("added_tokens", [])}
    unknown = model.get("unk_token")
    pieces = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in pieces] != list(range(len(pieces))):
        raise ConversionError(f"{tokenizer_json}: the vocabulary ids are not 0..{len(pieces) - 1}")
    piece_type = sp.ModelProto.SentencePiece
    proto = sp.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    proto.denormalizer_spec.add_dummy_prefix = False
    proto.denormalizer_spec.remove_extra_whitespaces = False
    for token, index in pieces:
        if token == unknown:
            kind = piece_type.UNKNOWN
        elif token in added:
            kind = piece_type.USER_DEFINED
            trainer.user_defined_symbols.append(token)
        elif _BYTE_PIECE.fullmatch(token):
            kind = piece_type.BYTE
        else:
            kind = piece_type.NORMAL
        proto.pieces.add(piece=token, score=-index, type=kind)
    for role in ("unk", "bos", "eos", "pad"):
        token = {"unk": unknown, "bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}[role]
        if token in vocab:
            setattr(trainer, f"{role}_id", vocab[token])
            setattr(trainer, f"{role}_piece", token)
    return proto.SerializeToString()


def _write_litertlm(
    tflite: Path, spm: Path, out: Path, context: int, template: str | None, scratch: Path
) -> None:
    from litert_lm_builder import litertlm_builder as builder
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    metadata = llm_metadata_pb2.LlmMetadata()
    metadata.start_token.token_str = START_TOKEN
    for token in STOP_TOKENS:
        metadata.stop_tokens.add().token_str = token
    metadata.max_num_tokens = context
    if template is not None:  # the model's own chat template travels with it
        metadata.jinja_prompt_template = template
    metadata.llm_model_type.CopyFrom(
        llm_model_type_pb2.LlmModelType(gemma3=llm_model_type_pb2.Gemma3())
    )
    metadata_path = scratch / "llm_metadata.pb"
    metadata_path.write_bytes(metadata.SerializeToString())
    bundle = builder.LitertLmFileBuilder()
    bundle.add_system_metadata(
        builder.Metadata(key="Authors", value="edgegemma", dtype=builder.DType.STRING)
    )
    bundle.add_llm_metadata(str(metadata_path))
    bundle.add_sentencepiece_tokenizer(str(spm))
    bundle.add_tflite_model(str(tflite), builder.TfLiteModelType.PREFILL_DECODE)
    with open(out, "wb") as f:
        bundle.build(f)


def _write_task(tflite: Path, spm: Path, out: Path) -> None:
    try:
        from mediapipe.tasks.python.genai.bundler import llm_bundler
    except ImportError as exc:
        raise ConversionError(
            f"writing model.task needs mediapipe==0.10.35, which has no wheel for "
            f"{platform.system()} {platform.machine()} ({exc}): convert on an x86-64 Linux, "
            "macOS or Windows machine and copy the build folder"
        ) from exc

    llm_bundler.create_bundle(
        llm_bundler.BundleConfig(
            tflite_model=str(tflite),
            tokenizer_model=str(spm),
            start_token=START_TOKEN,
            stop_tokens=list(STOP_TOKENS),
            output_filename=str(out),
        )
    )


def _export(checkpoint: Path, tflite: Path, options: Mapping[str, str], say: Progress) -> None:
    """Run :func:`_export_worker` in a child process; relay its progress, keep its log."""
    command = [
        sys.executable, "-m", __name__, str(checkpoint), str(tflite),
        options["quant"], options["lora_rank"], options["context"],
    ]  # fmt: skip
    log_path = tflite.with_suffix(".log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        assert child.stdout is not None
        for line in child.stdout:
            say(f"  {line.strip()} ({time.monotonic() - started:.0f} s)")
        status = child.wait()
    if status != 0 or not tflite.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise ConversionError(f"the TFLite export failed (exit status {status}):\n{tail}")


def _export_worker(
    checkpoint: Path, tflite: Path, quant: str, lora_rank: int, context: int
) -> None:
    import importlib
    import importlib.machinery
    import types

    import torch
    import torch._dynamo  # scans the installed modules once: it must not see the shim

    schema = importlib.import_module("ai_edge_litert.schema_py_generated")
    shim = {}
    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        package = types.ModuleType(name)
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__path__ = []
        shim[name] = package
    shim["tensorflow.lite.python.schema_py_generated"] = schema
    if any(name in sys.modules for name in shim):
        raise ConversionError("a tensorflow module is already imported; export in a fresh process")
    sys.modules.update(shim)
    try:
        from litert_torch._convert import interface
        from litert_torch.generative.examples.gemma3 import decoder as gemma3
        from litert_torch.generative.layers import kv_cache as kv_utils
        from litert_torch.generative.layers import lora as lora_utils
        from litert_torch.generative.layers import rotary_position_embedding as rope_utils
        from litert_torch.generative.utilities import converter, export_config, model_builder
    finally:
        for name in shim:
            del sys.modules[name]

    class _LoraDecoder(gemma3.Decoder):
        """Gemma 3's decoder, text only, with a ``lora`` argument for the attention layers."""

        @torch.inference_mode()
        def forward(self, tokens, input_pos, kv_cache, mask, lora=None, export_config=None):
            x = self.tok_embedding(tokens) * self.config.embedding_scale
            entries = []
            for i, block in enumerate(self.transformer_blocks):
                attention = self.config.block_config(i).attn_config
                rope = rope_utils.build_rope(input_pos, attention.head_dim, attention.rotary_base)
                layer_mask = self.get_local_global_attention_mask(
                    mask, attention.attn_type, input_pos, attention.sliding_window_size
                )
                adapter = lora.adapters[i] if lora is not None else None
                h, entry = block.atten_func(
                    block.pre_atten_norm(x),
                    rope,
                    layer_mask,
                    input_pos,
                    kv_cache.caches[i],
                    adapter,
                )
                x = x + block.post_atten_norm(h)
                x = x + block.ff(x)
                entries.append(entry)
            cache = kv_utils.KVCache(tuple(entries))
            if torch.numel(input_pos) > 1:  # prefill: only the cache is needed
                return {"kv_cache": cache}
            return {"logits": self.lm_head(self.final_norm(x)), "kv_cache": cache}

    hf_config = json.loads((checkpoint / "config.json").read_text())
    config = _decoder_config(gemma3, hf_config)
    print("loading the float checkpoint", flush=True)
    model = model_builder.build_decoder_only_model(
        str(checkpoint), config, gemma3.TENSOR_NAMES_SEP_QKV, model_class=_LoraDecoder
    )
    settings = export_config.ExportConfig(
        kvcache_layout=kv_utils.KV_LAYOUT_TRANSPOSED, mask_as_input=True
    )
    module = converter.ExportableModule(model, export_config=settings).eval()
    cache = kv_utils.KVCache.from_model_config(context, config, kv_layout=settings.kvcache_layout)
    lora = lora_utils.LoRA.zeros(lora_rank, config) if lora_rank else None

    def inputs(length: int, positions: torch.Tensor) -> dict:
        mask = torch.full((length, context), config.causal_mask_value).triu(diagonal=1)[None, None]
        sample = {"tokens": torch.zeros((1, length), dtype=torch.int), "input_pos": positions,
                  "kv_cache": cache, "mask": mask}  # fmt: skip
        return sample if lora is None else {**sample, "lora": lora}

    conversion = interface.Converter()
    conversion.add_signature(
        f"prefill_{LITERT_PREFILL_LENGTH}", module,
        sample_kwargs=inputs(LITERT_PREFILL_LENGTH, torch.arange(LITERT_PREFILL_LENGTH, dtype=torch.int)),
    )  # fmt: skip
    conversion.add_signature(
        "decode", module, sample_kwargs=inputs(1, torch.tensor([0], dtype=torch.int))
    )
    print("converting to TFLite", flush=True)
    edge_model = conversion.convert(
        quant_config=converter.get_quant_recipe_from_flag(quant, config)
    )
    print("writing the TFLite model", flush=True)
    edge_model.export(str(tflite))


def _decoder_config(gemma3: Any, hf_config: dict[str, Any]) -> Any:  # litert-torch is untyped
    """litert-torch's Gemma 3 decoder config matching the checkpoint's config.json."""
    if hf_config.get("model_type") != "gemma3_text":
        raise ConversionError(
            f"only Gemma 3 text models convert to LiteRT-LM, not {hf_config.get('model_type')!r}"
        )
    for config in (gemma3.get_decoder_config_270m(), gemma3.get_decoder_config_1b()):
        attention = config.block_config(0).attn_config
        if (
            config.num_layers == hf_config["num_hidden_layers"]
            and config.embedding_dim == hf_config["hidden_size"]
            and config.vocab_size == hf_config["vocab_size"]
            and attention.num_heads == hf_config["num_attention_heads"]
            and attention.num_query_groups == hf_config["num_key_value_heads"]
            and attention.head_dim == hf_config["head_dim"]
        ):
            return config
    raise ConversionError(
        "litert-torch knows the Gemma 3 270M and 1B layouts; this checkpoint is neither"
    )


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description="internal: the TFLite export step of a LiteRT build"
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("tflite", type=Path)
    parser.add_argument("quant", choices=LITERT_QUANTS)
    parser.add_argument("lora_rank", type=int)
    parser.add_argument("context", type=int)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _export_worker(args.checkpoint, args.tflite, args.quant, args.lora_rank, args.context)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
