"""llama.cpp backend, on llama-cpp-python's low-level C API.

The high-level ``llama_cpp.Llama`` is not used: its prompt cache ignores adapters, it sizes
its token buffer from the unpadded n_ctx, and it takes LoRA files only at construction.
Here the context, the adapter set and the KV cache are driven directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..adapters.gguf import check_lora, float32_copy
from ..errors import (
    AdapterError,
    ContextOverflowError,
    EdgeGemmaError,
    InvalidParameterError,
    ModelError,
    NumericalError,
)
from ..families import require
from ..gguffile import GGUFHeader, read_header
from ..memory import release_mapped_file
from ..partial_import import import_submodule
from ..sampling import SamplingParams
from .base import (
    AdapterHandle,
    Backend,
    BackendOptions,
    BatchedSequence,
    BatchRow,
    Features,
    ModelInfo,
    TokenMask,
    apply_mask,
    round_n_ctx,
    target_log_probs,
)

if TYPE_CHECKING:
    import llama_cpp.llama_cpp as ll
else:
    ll = import_submodule("llama_cpp.llama_cpp")  # the C bindings alone: partial_import.py

_N_BATCH = 512
_ROW_GROUP = 4
"""llama.cpp's repacked CPU kernels (Q4_K, IQ4_NL, ...) multiply a batch's rows four at a time
and the rows left over one at a time, which rounds differently. A prompt evaluated after a
reused prefix gets bit-identically a fresh evaluation's logits only if every row lands in the
same kind of group: the reused prefix is a multiple of this and batches start at multiples of
_N_BATCH, counted from position 0 (otherwise some greedy answers change)."""
_TILED_MIN_ROWS = 8
"""llama.cpp multiplies the K-quant matrices it does not repack (the Q6_K layers here) with a
tiled kernel in batches of 8 rows or more and row by row below that (ggml-cpu's tiled.cpp); the
two round differently. So a reused row must have come from a batch on the same side of 8 as
the one a fresh evaluation of the new prompt puts it in, and the rows evaluated after a reused
prefix too (otherwise some reuse lengths give visibly different logits)."""
_LOG_ERROR, _LOG_CONT = 4, 5
_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per sampler
_SCORE_CHUNK = 32
"""Tokens scored per decode: each needs a vocab-sized row of logits (1 MiB for Gemma 3)."""
_RELEASE_EVERY = 0.02
"""Fraction of the model loaded between two give-backs of its mapped pages (each parses
/proc/self/maps, so a few dozen of them are cheap next to the load)."""
_MAX_SEQUENCES = 8
"""Sequences one decode may hold (:meth:`LlamaCppBackend.score_many`: prompts and label
branches). The KV cache is unified, so cells cost nothing extra, but llama.cpp keeps a
resident vocab-sized logits row per possible sequence: more sequences cost peak memory, and
past this many classification gets no faster (docs/performance.md has the figures)."""
_GROUP_TOKENS = 256
"""Tokens :meth:`LlamaCppBackend.score_many` evaluates in one decode. The sequences share one
KV cache, so every token's attention spans the whole group's cells; a small group keeps that
span short, and groups from a quarter to twice this size classify equally fast
(docs/performance.md)."""
_GREEDY = SamplingParams()
_NON_FINITE = (
    "llama.cpp computed non-finite logits (NaN or infinity); an adapter scale far too large "
    "for the model does this"
)


class _NativeLog:
    """Collects llama.cpp's log lines, which carry the only explanation of its failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._capture: list[str] | None = None
        self._level = 0

    def callback(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level != _LOG_CONT:
            self._level = level
        capture = self._capture
        if capture is not None:
            capture.append(text.decode("utf-8", errors="replace"))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        with self._lock:
            # Again each time: importing llama-cpp-python's high-level API later in the process
            # installs its own logger (llama_cpp/_logger.py), which would take these lines.
            ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lines: list[str] = []
            self._capture = lines
            try:
                yield lines
            finally:
                self._capture = None


_native_log = _NativeLog()
_log_callback = ll.llama_log_callback(_native_log.callback)
_init_lock = threading.Lock()
_initialized = False


def _init_runtime() -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _initialized = True


def _reason(lines: list[str]) -> str:
    """The useful part of captured log lines: errors, else the last few lines."""
    text = "".join(lines)
    wanted = [
        line.strip()
        for line in text.splitlines()
        if "error" in line.lower() or "fail" in line.lower()
    ]
    chosen = wanted or [line.strip() for line in text.splitlines()[-3:]]
    return "; ".join(line for line in chosen if line) or "no reason given by llama.cpp"


class LlamaCppBackend(Backend):
    name = "llamacpp"
    model_suffixes = (".gguf",)
    features = Features(
        options=frozenset({"repack"}),
        score=True,
        batch=_MAX_SEQUENCES,
        # llama.cpp's CPU kernels multiply rows four at a time, so fewer sequences read the
        # weights once per row anyway: two together are no faster than one by one
        # (docs/performance.md).
        batch_min=4,
        batch_join=True,
        logits=True,
        adjustable_threads=True,
    )

    def __init__(
        self, header: GGUFHeader, model: ll.llama_model_p, ctx: ll.llama_context_p, n_ctx: int
    ):
        self._header = header
        self._model = model
        self._ctx = ctx
        self._vocab = ll.llama_model_get_vocab(model)
        self._memory = ll.llama_get_memory(ctx)
        self._sampler: ll.llama_sampler_p | None = None
        self._attached: list[tuple[AdapterHandle, float]] = []
        # The ctypes pointer objects llama.cpp returned; passed back to it as they are.
        self._loaded: list[AdapterHandle] = []
        self._n_past = 0  # tokens whose KV is in the cache
        self._prompt_length = 0  # of them, the prompt start() evaluated in batches
        self._pending: int | None = None  # sampled but not yet evaluated
        self._greedy = True  # argmax in numpy: a tenth of the time of llama.cpp's sampler
        self._logit_views: dict[int, np.ndarray] = {}
        self._batch = ll.llama_batch_init(_N_BATCH, 0, _MAX_SEQUENCES)
        self._running: _Batch | None = None  # the sequences of the last batch()
        self._piece_cache: dict[int, bytes] = {}
        n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        eog = frozenset(t for t in range(n_vocab) if ll.llama_vocab_is_eog(self._vocab, t))
        bos = ll.llama_vocab_bos(self._vocab)
        template = header.metadata.get("tokenizer.chat_template")
        self.info = ModelInfo(
            architecture=header.architecture,
            n_ctx=n_ctx,
            n_ctx_train=ll.llama_model_n_ctx_train(model),
            vocab_size=n_vocab,
            bos_id=bos if bos >= 0 and ll.llama_vocab_get_add_bos(self._vocab) else None,
            eog_ids=eog,
            can_shift=bool(ll.llama_memory_can_shift(self._memory)),
            # Identical logits without adapters (given _ROW_GROUP); under a LoRA, whose float32
            # products take other kernels for other batch sizes, they can differ visibly.
            exact_reuse=True,
            description=_model_description(model),
            chat_template=template if isinstance(template, str) and template else None,
        )

    @classmethod
    def open(cls, path: Path, options: BackendOptions) -> LlamaCppBackend:
        header = read_header(path)
        if header.file_type != "model":
            raise ModelError(f"{path.name} is a GGUF {header.file_type!r}, not a model")
        require(header.architecture, "backend:llamacpp", path.name)
        n_ctx_train = header.arch_value("context_length")
        n_ctx = round_n_ctx(options.n_ctx)
        if isinstance(n_ctx_train, int) and n_ctx > n_ctx_train:
            raise InvalidParameterError(
                f"n_ctx={options.n_ctx} is larger than the {n_ctx_train} tokens {path.name} was trained for"
            )
        _init_runtime()
        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = 0
        repack = options.extra.get("repack", True)
        if not isinstance(repack, bool):
            raise InvalidParameterError(f"repack must be True or False, got {repack!r}")
        # llama.cpp repacks Q4_0, IQ4_NL and Q4_K matrices into an interleaved layout its CPU
        # kernels decode faster, in a buffer of its own that costs a little peak memory
        # (docs/models.md has both figures).
        model_params.use_extra_bufts = repack
        # Repacking reads every page of the mapped file, and the pages read stay resident:
        # the stored and the repacked copy would both count (docs/models.md has the peak RSS).
        # The file's pages are given back while loading; those still used as stored
        # fault back in from the page cache on first use.
        released = 0.0

        def release(progress: float, _data: object) -> bool:
            nonlocal released
            if progress - released >= _RELEASE_EVERY:
                released = progress
                # Best effort: an exception escaping a ctypes callback returns False,
                # which would abort the load.
                with contextlib.suppress(Exception):
                    release_mapped_file(path)
            return True

        callback = ll.llama_progress_callback(release)
        model_params.progress_callback = callback
        with _native_log.capture() as lines:
            model = ll.llama_model_load_from_file(str(path).encode(), model_params)
        release_mapped_file(path)
        if not model:
            raise ModelError(f"llama.cpp could not load {path}: {_reason(lines)}")
        ctx_params = ll.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        # One decode may hold a whole context of tokens (batch(): every prompt at once);
        # llama.cpp still computes them _N_BATCH at a time.
        ctx_params.n_batch = n_ctx
        ctx_params.n_ubatch = _N_BATCH
        # One KV cache for every sequence: a sequence may use all of n_ctx, and sequences
        # that share a prefix share its cells (score_many).
        ctx_params.n_seq_max = _MAX_SEQUENCES
        ctx_params.kv_unified = True
        ctx_params.n_threads = options.n_threads
        ctx_params.n_threads_batch = options.n_threads
        # A full-size sliding-window cache keeps every position, so a prefix can be reused and
        # the context shifted at any length (it costs the KV memory of a full-attention layer).
        ctx_params.swa_full = True
        ctx_params.no_perf = True
        with _native_log.capture() as lines:
            ctx = ll.llama_init_from_model(model, ctx_params)
        if not ctx:
            ll.llama_model_free(model)
            raise ModelError(f"llama.cpp could not create a context for {path}: {_reason(lines)}")
        return cls(header, model, ctx, n_ctx)

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, True)
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._piece_cache[token] = buf.raw[:n]
        return piece

    # -- adapters --------------------------------------------------------------------------

    def load_adapter(self, path: Path) -> AdapterHandle:
        check_lora(path, self._header)
        # llama.cpp reads the tensors into its own buffers, so the copy can go right after.
        with tempfile.TemporaryDirectory(prefix="edgegemma-lora-") as scratch:
            source = float32_copy(path, Path(scratch) / "adapter.gguf") or path
            with _native_log.capture() as lines:
                adapter = ll.llama_adapter_lora_init(self._model, str(source).encode())
        if not adapter:
            raise AdapterError(f"llama.cpp rejected the adapter {path.name}: {_reason(lines)}")
        self._loaded.append(adapter)
        return adapter

    def free_adapter(self, handle: AdapterHandle) -> None:
        if any(h is handle for h, _ in self._attached):
            # Freeing an attached adapter would leave a dangling pointer in the context.
            self._apply_adapters([])
        self._loaded = [a for a in self._loaded if a is not handle]
        ll.llama_adapter_lora_free(handle)

    def _apply_adapters(self, adapters: Sequence[tuple[AdapterHandle, float]]) -> None:
        wanted = list(adapters)
        if wanted == self._attached:
            return
        n = len(wanted)
        handles = (ll.llama_adapter_lora_p_ctypes * n)(*(h for h, _ in wanted)) if n else None
        scales = (ctypes.c_float * n)(*(s for _, s in wanted)) if n else None
        with _native_log.capture() as lines:
            status = ll.llama_set_adapters_lora(self._ctx, handles, n, scales)
        if status != 0:
            raise AdapterError(f"llama.cpp could not attach the adapters: {_reason(lines)}")
        self._attached = wanted

    # -- generation ------------------------------------------------------------------------

    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        self._apply_adapters(adapters)
        keep = min(reuse, self._n_past, len(tokens) - 1)
        keep -= keep % _ROW_GROUP
        while keep and not _same_kernels(keep, self._prompt_length, len(tokens)):
            keep -= _ROW_GROUP
        if keep < self._n_past and not ll.llama_memory_seq_rm(self._memory, 0, keep, -1):
            keep = 0
        if keep == 0:
            ll.llama_memory_clear(self._memory, True)
        self._n_past = keep
        self._pending = None
        self._evaluate(tokens[keep:])
        self._prompt_length = len(tokens)
        self._greedy = sampling.greedy and sampling.repeat_penalty == 1.0
        self._new_sampler(sampling, tokens)
        return keep

    def next_token(self, mask: TokenMask | None = None) -> int:
        if self._pending is not None:
            self._evaluate([self._pending])
            self._pending = None
        logits = self._last_logits()
        if mask is not None:
            apply_mask(logits, mask)  # in llama.cpp's own buffer: its sampler sees it too
        if self._greedy:
            token = int(logits.argmax())
        else:
            assert self._sampler is not None
            token = ll.llama_sampler_sample(self._sampler, self._ctx, -1)
        if not math.isfinite(logits[token]):  # all-NaN logits pick token 0 and read as "length"
            raise NumericalError(_NON_FINITE)
        self._pending = token
        return token

    def score(
        self,
        prompt: Sequence[int],
        continuations: Sequence[Sequence[int]],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[float]:
        self.start(prompt, reuse=reuse, adapters=adapters, sampling=_GREEDY)
        # Every continuation's first token, from the prompt's logits, before any branch
        # overwrites them.
        [firsts] = target_log_probs(self._last_logits()[None, :], [[c[0] for c in continuations]])
        scores = []
        base = self._n_past
        for first, continuation in zip(firsts, continuations):
            # Each continuation branches from the prompt: its tokens but the last are
            # evaluated with logits for each.
            branch: list[_Entry] = [
                (token, base + t, (0,), [continuation[t + 1]])
                for t, token in enumerate(continuation[:-1])
            ]
            rest = 0.0
            if branch:
                rest = float(np.concatenate(self._decode_entries(branch)).sum())
                ll.llama_memory_seq_rm(self._memory, 0, base, -1)
            scores.append(float(first) + rest)
        return scores

    def score_many(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        *,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[list[float]]:
        self._apply_adapters(adapters)
        self._clear()
        branches = [c for c in continuations if len(c) > 1]
        extra = sum(len(c) - 1 for c in branches)  # cells each prompt's branches add
        seqs_each = 1 + len(branches)
        scores: list[list[float]] = []
        group: list[Sequence[int]] = []
        shared = group_tokens = 0  # the group's common prefix and its tokens, kept as it grows
        try:
            for prompt in prompts:
                # Too many branches for one decode, or too long to keep them all: this prompt
                # is scored alone, one branch at a time, as score() does.
                alone = seqs_each > _MAX_SEQUENCES or len(prompt) + extra > self.info.n_ctx
                joined_shared = (
                    min(shared, _common_prefix_length([group[0], prompt])) if group else len(prompt)
                )
                size = len(group) + 1
                cells = joined_shared + group_tokens + len(prompt) - size * (joined_shared - extra)
                if group and (alone or cells > _GROUP_TOKENS or size * seqs_each > _MAX_SEQUENCES):
                    scores.extend(self._score_group(group, continuations, branches))
                    group, group_tokens, joined_shared = [], 0, len(prompt)
                if alone:
                    scores.append(self.score(prompt, continuations, reuse=0, adapters=adapters))
                    self._clear()
                else:
                    group.append(prompt)
                    group_tokens += len(prompt)
                    shared = joined_shared
            if group:
                scores.extend(self._score_group(group, continuations, branches))
        finally:
            self._clear()
        return scores

    def _score_group(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        branches: Sequence[Sequence[int]],
    ) -> list[list[float]]:
        """Score every continuation after every prompt in one pass: the prompts' common
        prefix once for all, each prompt's rest as its own sequence, each continuation of
        several tokens (``branches``, in order) as a sequence branching from its prompt."""
        n = len(prompts)
        shared = min(_common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
        firsts = [c[0] for c in continuations]
        # Sequence ids: prompt k is k; its branch j is n + k * len(branches) + j.
        everyone = range(n * (1 + len(branches)))
        entries: list[_Entry] = [
            (token, pos, everyone, None) for pos, token in enumerate(prompts[0][:shared])
        ]
        for k, prompt in enumerate(prompts):
            own = [k, *range(n + k * len(branches), n + (k + 1) * len(branches))]
            for pos in range(shared, len(prompt)):
                entries.append((prompt[pos], pos, own, firsts if pos == len(prompt) - 1 else None))
            for j, branch in enumerate(branches):
                for t in range(len(branch) - 1):
                    entries.append((branch[t], len(prompt) + t, [own[1 + j]], [branch[t + 1]]))
        rows = iter(self._decode_entries(entries))
        self._clear()
        # Rows come per prompt: its last token's, then each branch's, in continuation order.
        return [
            [
                float(first[i]) + sum(float(next(rows)[0]) for _ in range(len(c) - 1))
                for i, c in enumerate(continuations)
            ]
            for first in (next(rows) for _ in prompts)
        ]

    def _decode_entries(self, entries: Sequence[_Entry]) -> list[np.ndarray]:
        """Evaluate ``entries`` (token, position, sequence ids, targets or None) in batches;
        for each entry with targets, in order, the targets' log-probabilities at it."""
        found: list[np.ndarray] = []
        batch = self._batch
        n = 0
        wanted: list[Sequence[int]] = []
        for index, (token, pos, seq_ids, targets) in enumerate(entries):
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = len(seq_ids)
            for s, seq_id in enumerate(seq_ids):
                batch.seq_id[n][s] = seq_id
            batch.logits[n] = targets is not None
            if targets is not None:
                wanted.append(targets)
            n += 1
            # Each output needs a vocabulary-sized row of logits: _SCORE_CHUNK bounds them.
            if n == _N_BATCH or len(wanted) == _SCORE_CHUNK or index == len(entries) - 1:
                batch.n_tokens = n
                with _native_log.capture() as lines:
                    status = ll.llama_decode(self._ctx, batch)
                if status != 0:
                    self._clear()
                    raise EdgeGemmaError(
                        f"llama_decode failed with status {status}: {_reason(lines)}"
                    )
                if wanted:
                    pointer = ll.llama_get_logits(self._ctx)
                    logits = np.ctypeslib.as_array(
                        pointer, shape=(len(wanted), self.info.vocab_size)
                    )
                    found.extend(target_log_probs(logits, wanted))
                n = 0
                wanted = []
        self._logit_views = {}
        return found

    def batch(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> list[BatchedSequence]:
        self._apply_adapters(adapters)
        self._clear()
        run = self._running = _Batch(self, sampling)
        return [BatchRow(run, run.add(prompt)) for prompt in prompts]

    def join(self, prompt: Sequence[int], *, max_tokens: int) -> BatchedSequence:
        assert self._running is not None, "join() after batch()"
        return BatchRow(self._running, self._running.add(prompt))

    def _clear(self) -> None:
        """Forget every sequence in the KV cache."""
        ll.llama_memory_clear(self._memory, True)
        self._n_past = 0
        self._prompt_length = 0
        self._pending = None

    def logits(self) -> np.ndarray:
        return self._last_logits()

    def _last_logits(self) -> np.ndarray:
        """A view (no copy) of the logits of the last evaluated token."""
        pointer = ll.llama_get_logits_ith(self._ctx, -1)
        address = ctypes.cast(pointer, ctypes.c_void_p).value or 0
        view = self._logit_views.get(address)
        if view is None:
            view = np.ctypeslib.as_array(pointer, shape=(self.info.vocab_size,))
            self._logit_views = {address: view}
        return view

    def set_threads(self, n_threads: int) -> None:
        ll.llama_set_n_threads(self._ctx, n_threads, n_threads)

    def shift(self, keep: int, discard: int) -> None:
        if not ll.llama_memory_seq_rm(self._memory, 0, keep, keep + discard):
            raise EdgeGemmaError("llama.cpp could not discard tokens from its KV cache")
        ll.llama_memory_seq_add(self._memory, 0, keep + discard, -1, -discard)
        self._n_past -= discard

    def _evaluate(self, tokens: Sequence[int]) -> None:
        # Batches end at multiples of _N_BATCH counted from position 0 (see _ROW_GROUP).
        first = _N_BATCH - self._n_past % _N_BATCH
        for start, end in itertools.pairwise(
            [0, *range(first, len(tokens), _N_BATCH), len(tokens)]
        ):
            chunk = tokens[start:end]
            array = (ll.llama_token * len(chunk))(*chunk)
            status = ll.llama_decode(self._ctx, ll.llama_batch_get_one(array, len(chunk)))
            if status != 0:
                # The cache may hold part of the chunk now: the engine treats it as unknown.
                self._clear()
                if status == 1:
                    raise ContextOverflowError(
                        "llama.cpp found no room in its KV cache",
                        prompt_tokens=len(tokens),
                        max_tokens=None,
                        n_ctx=self.info.n_ctx,
                    )
                raise EdgeGemmaError(f"llama_decode failed with status {status}")
            self._n_past += len(chunk)

    def _new_sampler(self, sampling: SamplingParams, history: Sequence[int]) -> None:
        if self._sampler is not None:
            ll.llama_sampler_free(self._sampler)
            self._sampler = None
        self._sampler = self._sampler_chain(sampling, history)

    def _sampler_chain(
        self, sampling: SamplingParams, history: Sequence[int]
    ) -> ll.llama_sampler_p:
        params = ll.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = ll.llama_sampler_chain_init(params)
        add = ll.llama_sampler_chain_add
        if sampling.repeat_penalty != 1.0:
            penalties = ll.llama_sampler_init_penalties(
                self.info.vocab_size, sampling.repeat_last_n, sampling.repeat_penalty, 0.0, 0.0
            )
            add(chain, penalties)
        if sampling.greedy:
            add(chain, ll.llama_sampler_init_greedy())
        else:
            add(chain, ll.llama_sampler_init_top_k(sampling.top_k))
            add(chain, ll.llama_sampler_init_top_p(sampling.top_p, 1))
            add(chain, ll.llama_sampler_init_min_p(sampling.min_p, 1))
            add(chain, ll.llama_sampler_init_temp(sampling.temperature))
            seed = _DEFAULT_SEED if sampling.seed is None else sampling.seed
            add(chain, ll.llama_sampler_init_dist(seed))
        if sampling.repeat_penalty != 1.0:
            for token in history[-sampling.repeat_last_n :]:
                ll.llama_sampler_accept(chain, token)
        return chain

    def close(self) -> None:
        ll.llama_batch_free(self._batch)
        if self._sampler is not None:
            ll.llama_sampler_free(self._sampler)
            self._sampler = None
        if self._attached:
            self._apply_adapters([])
        for handle in self._loaded:
            ll.llama_adapter_lora_free(handle)
        self._loaded.clear()
        ll.llama_free(self._ctx)
        ll.llama_model_free(self._model)


class _Batch:
    """Sequences of one :meth:`LlamaCppBackend.batch`, and those that join it. Each
    sequence's pending tokens (its prompt, then each token it samples) are evaluated when it
    next wants a token, together with every other sequence's: the engine drives them in
    lockstep, one token each per round, so one decode serves a whole round. A sequence that
    joins between two rounds has its prompt evaluated in the next round's decode."""

    def __init__(self, backend: LlamaCppBackend, sampling: SamplingParams):
        self.backend = backend
        self.sampling = sampling
        self.pending: dict[int, list[int]] = {}
        """Live sequence id -> its tokens not evaluated yet."""
        self.positions: dict[int, int] = {}
        self.rows: dict[int, int] = {}
        """Sequence -> its logits' index in the last decode, until it samples from them."""
        self.chosen_from: dict[int, np.ndarray] = {}
        """Sequence -> the logits its last token was chosen from (valid until the next decode)."""
        self.greedy = sampling.greedy and sampling.repeat_penalty == 1.0
        self.samplers: dict[int, ll.llama_sampler_p] = {}
        self.capacity = 0
        # An ll.llama_batch, typed as llama_batch_init() returns it: the class's stub types
        # pos as an array of arrays.
        self.llama_batch: Any = None

    def add(self, prompt: Sequence[int]) -> int:
        """A new sequence for ``prompt``, evaluated in the next decode; returns its id (the
        lowest free one: llama.cpp's context holds ``_MAX_SEQUENCES``). Also after every
        sequence has finished: the engine may still be sending a stream's last text."""
        seq = min(set(range(_MAX_SEQUENCES)) - self.pending.keys())
        self.pending[seq] = list(prompt)
        self.positions[seq] = 0
        if not self.greedy:
            self.samplers[seq] = self.backend._sampler_chain(self.sampling, prompt)
        needed = sum(len(tokens) for tokens in self.pending.values())
        if needed > self.capacity:
            if self.llama_batch is not None:
                ll.llama_batch_free(self.llama_batch)
            self.capacity = max(needed, 2 * self.capacity)
            self.llama_batch = ll.llama_batch_init(self.capacity, 0, 1)
        return seq

    def sample(self, seq: int, mask: TokenMask | None) -> int:
        """``seq``'s next token, from its newest logits (evaluating the round first)."""
        row = self.rows.pop(seq, None)
        if row is None:
            self._evaluate()
            row = self.rows.pop(seq)
        pointer = ll.llama_get_logits_ith(self.backend._ctx, row)
        logits = np.ctypeslib.as_array(pointer, shape=(self.backend.info.vocab_size,))
        if mask is not None:
            apply_mask(logits, mask)  # in llama.cpp's buffer: its sampler sees it too
        if self.greedy:
            token = int(logits.argmax())
        else:
            token = ll.llama_sampler_sample(self.samplers[seq], self.backend._ctx, row)
        if not math.isfinite(logits[token]):
            raise NumericalError(_NON_FINITE)
        self.chosen_from[seq] = logits
        self.pending[seq] = [token]
        return token

    def finish(self, seq: int) -> None:
        if self.pending.pop(seq, None) is None:
            return  # finished already
        self.rows.pop(seq, None)
        self.chosen_from.pop(seq, None)
        chain = self.samplers.pop(seq, None)
        if chain is not None:
            ll.llama_sampler_free(chain)
        ll.llama_memory_seq_rm(self.backend._memory, seq, -1, -1)
        if not self.pending:
            self.close()

    def close(self) -> None:
        for chain in self.samplers.values():
            ll.llama_sampler_free(chain)
        self.samplers = {}
        if self.llama_batch is not None:
            ll.llama_batch_free(self.llama_batch)
            self.llama_batch = None
            self.capacity = 0  # a sequence that joins later gets a new one

    def _evaluate(self) -> None:
        if self.rows:
            # Another sequence has logits it has not sampled from, which this decode would
            # overwrite: the engine broke the lockstep.
            raise EdgeGemmaError("batched sequences were driven out of step")
        batch = self.llama_batch
        assert batch is not None
        n = 0
        for seq, tokens in self.pending.items():
            for k, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = self.positions[seq] + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = k == len(tokens) - 1
                if k == len(tokens) - 1:
                    self.rows[seq] = n
                n += 1
            self.positions[seq] += len(tokens)
        batch.n_tokens = n
        with _native_log.capture() as lines:
            status = ll.llama_decode(self.backend._ctx, batch)
        for seq in self.pending:
            self.pending[seq] = []
        if status != 0:
            self.rows = {}
            self.backend._clear()
            raise EdgeGemmaError(f"llama_decode failed with status {status}: {_reason(lines)}")


_Entry = tuple[int, int, Sequence[int], Sequence[int] | None]
"""A token to evaluate: id, position, the sequences it belongs to, and the tokens whose
log-probability after it is wanted (None: no logits)."""


def _same_kernels(keep: int, cached_prompt: int, prompt: int) -> bool:
    """Whether reusing ``keep`` cached tokens of an earlier ``cached_prompt``-token prompt leaves
    every row of a ``prompt``-token prompt on the kernels its fresh evaluation would use (see
    _TILED_MIN_ROWS; batches end at multiples of _N_BATCH, so only the batch holding the last
    reused row and the one holding the first new row can differ)."""

    def tiled(first: int, end: int) -> bool:
        return end - first >= _TILED_MIN_ROWS

    last = keep - 1
    start = last - last % _N_BATCH
    if keep <= cached_prompt and tiled(start, min(start + _N_BATCH, cached_prompt)) != tiled(
        start, min(start + _N_BATCH, prompt)
    ):
        return False
    start = keep - keep % _N_BATCH
    end = min(start + _N_BATCH, prompt)
    return tiled(keep, end) == tiled(start, end)


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != first[i] for s in sequences):
            return i
    return length


def _model_description(model: ll.llama_model_p) -> str:
    buf = ctypes.create_string_buffer(256)
    n = ll.llama_model_desc(model, buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n > 0 else ""
