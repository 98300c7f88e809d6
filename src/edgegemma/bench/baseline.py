"""The reference the engine is measured against: a minimal raw llama.cpp decode loop.

No edgegemma engine, backend or policy: llama-cpp-python's C API only -- load the model,
``llama_decode`` the prompt in batches, then sample greedily and decode one token at a time
until ``max_tokens`` or an end-of-generation token. The context is created with the same
parameters as edgegemma's llamacpp backend (n_ctx rounded up to 256, batch 512, full-size
sliding-window cache, the same thread count), so the ratio engine / raw loop measures what
the engine adds, not a different configuration. Timings are taken exactly as
:class:`edgegemma.Stats` takes them: TTFT from the call to the first sampled token, decode
speed over the tokens after the first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ..errors import ModelError

_N_CTX_STEP = 256
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


class RawLoop:
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
        params.n_ctx = -(-n_ctx // _N_CTX_STEP) * _N_CTX_STEP
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
        first_token_at = last_token_at = started
        generated = sampled = 0
        while generated < max_tokens:
            token = ll.llama_sampler_sample(self._sampler, self._ctx, -1)
            sampled += 1
            last_token_at = time.perf_counter()
            if sampled == 1:
                first_token_at = last_token_at
            if ll.llama_vocab_is_eog(self._vocab, token):
                break
            generated += 1
            if generated < max_tokens:
                self._decode([token])
        decode_s = last_token_at - first_token_at
        return RawStats(
            prompt_tokens=len(prompt),
            completion_tokens=generated,
            ttft_s=first_token_at - started,
            prefill_s=prefill_s,
            decode_s=decode_s,
            total_s=time.perf_counter() - started,
            prefill_tps=len(prompt) / prefill_s if prefill_s > 0 else 0.0,
            decode_tps=(sampled - 1) / decode_s if sampled > 1 and decode_s > 0 else 0.0,
        )

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
