"""What the engine is measured against: each runtime driven alone, and llama-cpp-python's own API.

No edgegemma engine, backend or policy in any of them; each loads the model, evaluates the
prompt and decodes greedily until ``max_tokens`` or an end token, timed exactly as
:class:`edgegemma.Stats` is (TTFT from the call to the first token, decode speed over the
tokens after the first):

- :class:`LlamaCppLoop` (``raw``, llamacpp): llama-cpp-python's C API -- ``llama_decode`` in
  batches and a greedy sampler -- with the context edgegemma's backend creates (n_ctx rounded
  up to 256, batch 512, full-size sliding-window cache, the same thread count), so the ratio
  measures what the engine adds, not a different configuration.
- :class:`OnnxLoop` (``raw``, onnx): ONNX Runtime GenAI's own generator with greedy search, the
  model's own configuration and the same thread count.
- :class:`LiteRTLoop` (``raw``, mediapipe): a LiteRT-LM session prefilled with the prompt's
  text and decoding greedily; its timings are the runtime's own benchmark figures.
- :class:`HighLevelLlama` (``llama-cpp-python``): ``llama_cpp.Llama(...).create_completion``
  streaming, as a user of llama-cpp-python would call it, with its defaults except n_ctx,
  threads and batch size: the peer a user would pick instead of edgegemma.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ..backends.base import round_n_ctx
from ..errors import ModelError

_N_BATCH = 512
_silent_log = None


@dataclass(frozen=True)
class RawStats:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    prefill_s: float
    decode_s: float
    total_s: float
    prefill_tps: float
    decode_tps: float


def _stats(
    started: float, prompt_tokens: int, prefill_s: float, stamps: Sequence[float], generated: int
) -> RawStats:
    """Figures from the call's start and the time each token was had (``stamps``)."""
    first = stamps[0] if stamps else started + prefill_s
    decode_s = stamps[-1] - first if len(stamps) > 1 else 0.0
    return RawStats(
        prompt_tokens=prompt_tokens,
        completion_tokens=generated,
        ttft_s=first - started,
        prefill_s=prefill_s,
        decode_s=decode_s,
        total_s=time.perf_counter() - started,
        prefill_tps=prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
        decode_tps=(len(stamps) - 1) / decode_s if decode_s > 0 else 0.0,
    )


class _Loop:
    vocab_size: int
    bos_id: int | None

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int):
        raise NotImplementedError

    def generate(self, prompt: Sequence[int], max_tokens: int) -> RawStats:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LlamaCppLoop(_Loop):
    """One llama.cpp model and context driven by hand."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int):
        import llama_cpp as ll

        self._ll = ll
        global _silent_log
        if _silent_log is None:  # llama.cpp keeps the pointer: the callback must outlive us
            _silent_log = ll.llama_log_callback(lambda level, text, user_data: None)
            ll.llama_log_set(_silent_log, None)
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = ll.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ModelError(f"llama.cpp could not load {path}")
        params = ll.llama_context_default_params()
        params.n_ctx = round_n_ctx(n_ctx)
        params.n_batch = params.n_ubatch = _N_BATCH
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads
        params.swa_full = True
        params.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, params)
        if not self._ctx:
            ll.llama_model_free(self._model)
            raise ModelError(f"llama.cpp could not create a context for {path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self._memory = ll.llama_get_memory(self._ctx)
        sampler_params = ll.llama_sampler_chain_default_params()
        sampler_params.no_perf = True
        self._sampler = ll.llama_sampler_chain_init(sampler_params)
        ll.llama_sampler_chain_add(self._sampler, ll.llama_sampler_init_greedy())
        self.vocab_size = ll.llama_vocab_n_tokens(self._vocab)
        bos = ll.llama_vocab_bos(self._vocab)
        self.bos_id = bos if bos >= 0 and ll.llama_vocab_get_add_bos(self._vocab) else None

    def generate(self, prompt: Sequence[int], max_tokens: int) -> RawStats:
        """Evaluate ``prompt`` from an empty cache, then decode up to ``max_tokens`` tokens."""
        ll = self._ll
        started = time.perf_counter()
        ll.llama_memory_clear(self._memory, True)
        ll.llama_sampler_reset(self._sampler)
        for start in range(0, len(prompt), _N_BATCH):
            self._decode(prompt[start : start + _N_BATCH])
        prefill_s = time.perf_counter() - started
        stamps: list[float] = []
        generated = 0
        while generated < max_tokens:
            token = ll.llama_sampler_sample(self._sampler, self._ctx, -1)
            stamps.append(time.perf_counter())
            if ll.llama_vocab_is_eog(self._vocab, token):
                break
            generated += 1
            if generated < max_tokens:
                self._decode([token])
        return _stats(started, len(prompt), prefill_s, stamps, generated)

    def _decode(self, tokens: Sequence[int]) -> None:
        ll = self._ll
        array = (ll.llama_token * len(tokens))(*tokens)
        status = ll.llama_decode(self._ctx, ll.llama_batch_get_one(array, len(tokens)))
        if status != 0:
            raise ModelError(f"llama_decode failed with status {status}")

    def close(self) -> None:
        ll = self._ll
        ll.llama_sampler_free(self._sampler)
        ll.llama_free(self._ctx)
        ll.llama_model_free(self._model)


class OnnxLoop(_Loop):
    """ONNX Runtime GenAI's generator with its own greedy search."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int):
        import json

        import numpy as np
        import onnxruntime_genai as og

        self._og, self._np = og, np
        config = og.Config(str(path))
        config.clear_providers()
        session = {"intra_op_num_threads": n_threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self._model = og.Model(config)
        facts = json.loads((path / "genai_config.json").read_text())["model"]
        self.vocab_size = int(facts["vocab_size"])
        self.bos_id = facts.get("bos_token_id")
        eos = facts.get("eos_token_id", [])
        self._eos = set(eos if isinstance(eos, list) else [eos])
        self._max_length = max(n_ctx, 512)  # the runtime refuses less than Gemma 3's window

    def generate(self, prompt: Sequence[int], max_tokens: int) -> RawStats:
        og = self._og
        started = time.perf_counter()
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=self._max_length, do_sample=False)
        generator = og.Generator(self._model, params)
        generator.append_tokens(self._np.asarray(prompt, dtype=self._np.int32))
        prefill_s = time.perf_counter() - started
        stamps: list[float] = []
        generated = 0
        while generated < max_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            stamps.append(time.perf_counter())
            if token in self._eos:
                break
            generated += 1
        return _stats(started, len(prompt), prefill_s, stamps, generated)

    def close(self) -> None:
        del self._model


class LiteRTLoop(_Loop):
    """A LiteRT-LM session per request, greedy; the runtime's own timings."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int):
        import litert_lm

        from ..adapters.litert import write_lora, zero_lora
        from ..locations import home
        from ..tflitefile import inspect_model

        self._lm = litert_lm
        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        facts = inspect_model(path)
        self._scratch = tempfile.TemporaryDirectory(prefix="edgegemma-bench-")
        self._lora: Path | None = None
        rank_config = None
        if facts.lora is not None:  # a LoRA model must run with a LoRA: the all-zero one
            self._lora = write_lora(
                Path(self._scratch.name) / "zero.lora", zero_lora(facts.lora), rank=facts.lora.rank
            )
            rank_config = litert_lm.LoraRankConfig(lora_rank=facts.lora.rank)
        cache = home() / "litert-cache" / "bench"
        cache.mkdir(parents=True, exist_ok=True)
        self._engine = litert_lm.Engine(
            str(path),
            backend=litert_lm.Backend.CPU(thread_count=n_threads),
            max_num_tokens=n_ctx,
            cache_dir=str(cache),
            enable_benchmark=True,
            lora_rank_config=rank_config,
        )
        self.vocab_size = int(facts.vocab_size or 0)
        bos = self._engine.bos_token_id
        self.bos_id = bos if bos is not None and bos >= 0 else None

    def generate(self, prompt: Sequence[int], max_tokens: int) -> RawStats:
        lm = self._lm
        body = prompt[1:] if self.bos_id is not None and prompt[:1] == [self.bos_id] else prompt
        text = self._engine.detokenize(list(body))
        started = time.perf_counter()
        session = self._engine.create_session(
            apply_prompt_template=False,
            sampler_config=lm.SamplerConfig(top_k=1, top_p=1.0, temperature=0.0, seed=0),
            max_output_tokens=max(1, max_tokens),
            lora_config=lm.LoraConfig(lora_path=str(self._lora)) if self._lora else None,
        )
        try:
            session.run_prefill([text])
            session.run_decode()
            info: Any = session.get_benchmark_info()
        finally:
            session.close()
        total = time.perf_counter() - started
        prompt_tokens = int(info.last_prefill_token_count)
        generated = int(info.last_decode_token_count)
        prefill_tps = float(info.last_prefill_tokens_per_second)
        return RawStats(
            prompt_tokens=prompt_tokens,
            completion_tokens=generated,
            ttft_s=float(info.time_to_first_token_in_second),
            prefill_s=prompt_tokens / prefill_tps if prefill_tps else 0.0,
            decode_s=generated / float(info.last_decode_tokens_per_second)
            if info.last_decode_tokens_per_second
            else 0.0,
            total_s=total,
            prefill_tps=prefill_tps,
            decode_tps=float(info.last_decode_tokens_per_second),
        )

    def close(self) -> None:
        self._engine.close()
        self._scratch.cleanup()


class HighLevelLlama(_Loop):
    """``llama_cpp.Llama.create_completion``, streamed, greedy, as its users call it."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int):
        import llama_cpp

        self._llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=round_n_ctx(n_ctx),
            n_batch=_N_BATCH,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        self.vocab_size = self._llm.n_vocab()
        self.bos_id = self._llm.token_bos()

    def generate(self, prompt: Sequence[int], max_tokens: int) -> RawStats:
        llm = self._llm
        llm.reset()  # no prompt cache: every repetition evaluates its whole prompt
        started = time.perf_counter()
        stamps: list[float] = []
        counts: list[int] = []
        for _ in llm.create_completion(
            list(prompt), max_tokens=max_tokens, temperature=0.0, stream=True
        ):
            stamps.append(time.perf_counter())
            counts.append(llm.n_tokens - len(prompt))
        generated = counts[-1] + 1 if counts else 0  # the last chunk's token is not evaluated
        first = stamps[0] if stamps else time.perf_counter()
        # A chunk may carry several tokens (text held back mid-character): rate by tokens.
        decode_s = stamps[-1] - first if len(stamps) > 1 else 0.0
        decoded = counts[-1] - counts[0] if counts else 0
        return RawStats(
            prompt_tokens=len(prompt),
            completion_tokens=generated,
            ttft_s=first - started,
            prefill_s=first - started,
            decode_s=decode_s,
            total_s=time.perf_counter() - started,
            prefill_tps=len(prompt) / (first - started) if first > started else 0.0,
            decode_tps=decoded / decode_s if decode_s > 0 else 0.0,
        )

    def close(self) -> None:
        self._llm.close()


RAW_LOOPS: dict[str, type[_Loop]] = {
    "llamacpp": LlamaCppLoop,
    "onnx": OnnxLoop,
    "mediapipe": LiteRTLoop,
}
"""The runtime-alone loop of each built-in backend."""


def open_loop(runner: str, backend: str, path: Path, *, n_ctx: int, n_threads: int) -> _Loop:
    """The reference loop ``runner`` (``raw`` or ``llama-cpp-python``) for ``backend``.

    A GGUF given to the onnx or mediapipe loop stands for its cached build, as it does for
    ``edgegemma.load(gguf, backend=...)``.
    """
    if runner == "llama-cpp-python":
        return HighLevelLlama(path, n_ctx=n_ctx, n_threads=n_threads)
    if backend != "llamacpp" and path.suffix.lower() == ".gguf":
        path = _built(backend, path)
    return RAW_LOOPS[backend](path, n_ctx=n_ctx, n_threads=n_threads)


def _built(backend: str, gguf: Path) -> Path:
    from ..builds import find_build
    from ..recipes import LITERT_FILES, litert_options, onnx_options

    kind, options = (
        ("onnx", onnx_options()) if backend == "onnx" else ("litert", litert_options(lora_rank=16))
    )
    folder = find_build(gguf, kind, options)
    if folder is None:
        raise ModelError(f"no {kind} build of {gguf.name} in the cache (edgegemma convert)")
    return folder if kind == "onnx" else folder / LITERT_FILES["task"]
