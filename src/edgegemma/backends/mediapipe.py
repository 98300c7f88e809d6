"""MediaPipe LLM Inference backend, on LiteRT-LM.

LiteRT-LM is the runtime behind MediaPipe's LLM Inference API; on a desktop or a Pi its
Python package (``litert-lm-api``) runs the same ``.task`` and ``.litertlm`` bundles that an
Android app loads. Its API speaks text, not token ids: a session is prefilled with strings and
streams text pieces while it decodes in a worker thread. This backend maps that onto the
token-id interface:

- A prompt is passed as text pieces that the runtime's tokenizer turns back into exactly the
  engine's ids (checked; each piece is tokenized on its own, so a piece per token always
  works). The session adds BOS itself.
- Generated ids are the runtime's text pieces tokenized again. The text is exact; the ids
  are the canonical tokenization of it, which is what the model emits in nearly all cases
  (it can differ where the model spelled a word in unusual pieces).
- The decode thread is held back by a one-slot queue, so it runs at most a token or two
  ahead of the engine and idles once the engine stops reading.
- No KV cache survives a session, and sampler settings and the LoRA are fixed per session,
  so every generation starts a new session and prefills its whole prompt.

LoRA (the format lives in :mod:`edgegemma.adapters.litert`): a session takes one LoRA file. The base model is an
all-zero LoRA (a LoRA model run without one misbehaves), scales and sets of several adapters
are written as one combined file, adapter files are checked against the model's LoRA inputs
when they are loaded, and should the runtime still reject one, the engine is recreated (the
runtime is unusable after a failed LoRA load).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import queue
import random
import tempfile
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import litert_lm
import numpy as np
from litert_lm._ffi import STREAM_CALLBACK_TYPE

from ..adapters.litert import check_lora, combine, read_lora, write_lora, zero_lora
from ..builds import find_build
from ..errors import (
    AdapterError,
    ContextOverflowError,
    EdgeGemmaError,
    InvalidParameterError,
    ModelError,
    NumericalError,
)
from ..families import require
from ..gguffile import read_header
from ..locations import home
from ..recipes import LITERT_FILES, litert_options
from ..sampling import SamplingParams
from ..stderr import captured_stderr
from ..tflitefile import LoraSpec, TfliteFacts, bundle_chat_template, inspect_model
from .base import AdapterHandle, Backend, BackendOptions, Features, ModelInfo, TokenMask

_LORA_FILES_KEPT = 4
"""LoRA files kept for sets of adapters with scales (each a few MB on disk)."""
_PIECE_CACHE = 4096
"""Text pieces whose token ids are remembered: tokenizing each decoded piece again is the
backend's main cost per token."""
_SESSIONS_PER_ENGINE = 16
"""LiteRT-LM 0.18 keeps each session's LoRA weights until its engine is deleted; recreating
the engine (cheap next to a generation) after this many LoRA sessions bounds that growth."""


@dataclass(eq=False)
class _Adapter:
    path: Path
    tensors: dict[str, np.ndarray]


class MediaPipeBackend(Backend):
    name = "mediapipe"
    model_suffixes = (".litertlm", ".task")
    # LiteRT-LM's session sampler has top-k, top-p, temperature and a seed, nothing else.
    features = Features(sampling=frozenset(), score=True)

    def __init__(self, path: Path, facts: TfliteFacts, n_ctx: int, n_threads: int):
        self._path = path
        self._facts = facts
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._cache_dir = _cache_dir(path)
        self._engine = self._create_engine()
        self._lora_sessions = 0
        self._generation: _Generation | None = None
        self._runtime: dict[str, float] = {}
        self._pending: deque[int] = deque()
        self._piece_cache: dict[int, bytes] = {}
        self._piece_ids: dict[str, list[int]] = {}
        self._byte_base = self._find_byte_tokens()
        # LoRA files written for sets of adapters with scales, least recently used first.
        self._lora_files: OrderedDict[tuple[tuple[int, float], ...], Path] = OrderedDict()
        self._file_ids = itertools.count(1)
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._zero_lora = self._write_zero_lora(facts.lora) if facts.lora else None
        stops = {ids[0] for ids in self._engine.eos_token_ids if len(ids) == 1}
        self._eos = min(stops) if stops else -1
        bos = self._engine.bos_token_id
        pad = self._engine.tokenize("<pad>")
        self._pad = pad[0] if len(pad) == 1 else None
        # Special tokens stand for no text in output (the runtime spells them "<pad>",
        # "<eos>", ...); in a prompt (a chat's "<end_of_turn>") they are given by that spelling.
        self._spellings: dict[int, bytes] = {}
        for special in (*stops, bos, self._pad):
            if special is not None and special >= 0:
                spelling = self._engine.detokenize([special])
                if self._engine.tokenize(spelling) == [special]:
                    self._spellings[special] = spelling.encode("utf-8")
                self._piece_cache[special] = b""
        lora = f", LoRA rank {facts.lora.rank}" if facts.lora else ", no LoRA inputs"
        assert facts.vocab_size is not None  # open() refuses a graph without logits
        self.info = ModelInfo(
            architecture="litert-lm",
            n_ctx=n_ctx,
            n_ctx_train=facts.kv_cache_length or n_ctx,
            vocab_size=facts.vocab_size,
            bos_id=bos if bos is not None and bos >= 0 else None,
            eog_ids=frozenset(stops),
            can_shift=False,
            description=f"LiteRT-LM {path.suffix[1:]} bundle {path.name}{lora}",
            chat_template=bundle_chat_template(path),
        )

    @classmethod
    def open(cls, path: Path, options: BackendOptions) -> MediaPipeBackend:
        if path.suffix.lower() == ".gguf":
            if path.is_file():
                require(
                    read_header(path).architecture, "backend:mediapipe", path.name
                )  # before any build
            path = _built_bundle(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        facts = inspect_model(path)
        if facts.vocab_size is None:
            raise ModelError(f"{path.name}: its decode signature has no logits output")
        limit = facts.kv_cache_length
        if limit is not None and options.n_ctx > limit:
            raise InvalidParameterError(
                f"n_ctx={options.n_ctx} is larger than the {limit}-token KV cache {path.name} was "
                f"converted with; load with n_ctx <= {limit}, or convert again with a larger --context"
            )
        return cls(path, facts, options.n_ctx, options.n_threads)

    def _create_engine(self) -> litert_lm.Engine:
        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        lora = self._facts.lora
        try:
            with captured_stderr() as log:
                return litert_lm.Engine(
                    str(self._path),
                    backend=litert_lm.Backend.CPU(thread_count=self._n_threads),
                    max_num_tokens=self._n_ctx,
                    cache_dir=str(self._cache_dir),
                    enable_benchmark=True,
                    lora_rank_config=litert_lm.LoraRankConfig(lora_rank=lora.rank)
                    if lora
                    else None,
                )
        except RuntimeError as exc:
            raise ModelError(
                f"LiteRT-LM could not load {self._path.name}: {_runtime_errors(log()) or exc}"
            ) from None

    def _find_byte_tokens(self) -> int | None:
        """The id of ``<0x00>`` when the vocabulary has SentencePiece byte tokens, else None.

        A byte token alone is not text, so the runtime detokenizes it to U+FFFD; its byte is
        found from its id instead. Byte pieces are consecutive; a character outside the
        vocabulary is spelled with them, which locates the block.
        """
        probe = "\U0010fffd"
        data = probe.encode("utf-8")
        ids = self._engine.tokenize(probe)
        if len(ids) != len(data):
            return None
        base = ids[0] - data[0]
        return base if all(t - base == b for t, b in zip(ids, data)) else None

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self._engine.tokenize(text) if text else []

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            if self._byte_base is not None and 0 <= token - self._byte_base < 256:
                piece = bytes([token - self._byte_base])
            else:
                piece = self._engine.detokenize([token]).encode("utf-8")
            self._piece_cache[token] = piece
        return piece

    # -- adapters --------------------------------------------------------------------------

    def load_adapter(self, path: Path) -> AdapterHandle:
        spec = self._facts.lora
        if spec is None:
            raise AdapterError(
                f"{self._path.name} was converted without LoRA inputs and cannot take adapters; "
                "convert it with --lora-rank 16 (edgegemma convert MODEL --to litert --lora-rank 16)"
            )
        rank, tensors = read_lora(path)
        check_lora(rank, tensors, spec, name=path.name)
        return _Adapter(path=path, tensors=tensors)

    def free_adapter(self, handle: AdapterHandle) -> None:
        for key in [k for k in self._lora_files if any(h == id(handle) for h, _ in k)]:
            self._lora_files.pop(key).unlink(missing_ok=True)

    def _lora_path(self, adapters: Sequence[tuple[AdapterHandle, float]]) -> Path | None:
        spec = self._facts.lora
        if spec is None:
            if adapters:
                raise AdapterError(f"{self._path.name} has no LoRA inputs")
            return None
        if not adapters:
            return self._zero_lora
        if len(adapters) == 1 and adapters[0][1] == 1.0:
            return adapters[0][0].path
        key = tuple((id(handle), scale) for handle, scale in adapters)
        found = self._lora_files.get(key)
        if found is not None:
            self._lora_files.move_to_end(key)
            return found
        while len(self._lora_files) >= _LORA_FILES_KEPT:
            self._lora_files.popitem(last=False)[1].unlink(missing_ok=True)
        tensors = combine([(handle.tensors, scale) for handle, scale in adapters], spec)
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="edgegemma-litert-")
        found = write_lora(
            Path(self._scratch.name) / f"set-{next(self._file_ids)}.tflite", tensors, rank=spec.rank
        )
        self._lora_files[key] = found
        return found

    def _write_zero_lora(self, spec: LoraSpec) -> Path:
        shapes = repr(sorted(spec.shapes.items())).encode()
        path = (
            self._cache_dir
            / f"zero-lora-r{spec.rank}-{hashlib.sha256(shapes).hexdigest()[:12]}.tflite"
        )
        if not path.is_file():
            try:
                write_lora(path, zero_lora(spec), rank=spec.rank)
            except OSError as exc:
                raise ModelError(f"cannot write {path}: {exc.strerror}") from None
        return path

    # -- generation ------------------------------------------------------------------------

    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        self._stop()
        self._runtime = {}
        session = self._prefilled_session(tokens, adapters, sampling)
        info = session.get_benchmark_info()
        self._runtime = {
            "init_s": info.init_time_in_second,
            "prefill_tokens": float(info.last_prefill_token_count),
            "prefill_tps": info.last_prefill_tokens_per_second,
        }
        self._generation = _Generation(session)
        return 0

    def score(
        self,
        prompt: Sequence[int],
        continuations: Sequence[Sequence[int]],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[float]:
        # LiteRT-LM scores a text after a prefill (Session.run_text_scoring), one target per
        # session: scoring appends the target to the session's context. So each continuation
        # gets a session of its own, prefilled with the prompt: exact, one prefill per label.
        self._stop()
        scores = []
        for continuation in continuations:
            text = self._text(continuation)
            if text is None or self.tokenize(text) != list(continuation):
                raise InvalidParameterError(
                    f"token ids {list(continuation)[:8]} do not spell text that LiteRT-LM "
                    "tokenizes back to them; it scores text"
                )
            session = self._prefilled_session(prompt, adapters, SamplingParams())
            try:
                found = session.run_text_scoring([text], store_token_lengths=True)
            except RuntimeError as exc:
                raise EdgeGemmaError(f"LiteRT-LM could not score {text!r}: {exc}") from None
            finally:
                session.close()
            lengths = list(getattr(found, "token_lengths", []) or [])
            if lengths and lengths[0] != len(continuation):
                raise EdgeGemmaError(
                    f"LiteRT-LM scored {lengths[0]} tokens of {text!r}, edgegemma asked for "
                    f"{len(continuation)}"
                )
            scores.append(float(found.scores[0]))
        return scores

    def _prefilled_session(
        self,
        tokens: Sequence[int],
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> litert_lm.Session:
        """A new session with the sampler and the LoRA of the call, prefilled with ``tokens``."""
        bos = self.info.bos_id
        if bos is not None and (not tokens or tokens[0] != bos):
            raise InvalidParameterError(
                "LiteRT-LM starts every sequence with BOS: a token-id prompt must begin with it"
            )
        pieces = self._prompt_pieces(tokens[1:] if bos is not None else tokens)
        lora = self._lora_path(adapters)
        if lora is not None and self._lora_sessions >= _SESSIONS_PER_ENGINE:
            self._engine.close()
            self._engine = self._create_engine()
            self._lora_sessions = 0
        try:
            session = self._engine.create_session(
                apply_prompt_template=False,
                sampler_config=self._sampler(sampling),
                max_output_tokens=max(1, self._n_ctx - len(tokens)),
                lora_config=litert_lm.LoraConfig(lora_path=str(lora)) if lora else None,
            )
        except RuntimeError:
            if lora is None:
                raise EdgeGemmaError(
                    "LiteRT-LM could not start a session (its log above says why)"
                ) from None
            # The runtime's checks of a LoRA file run here; after a failed one it needs a new engine.
            self._engine.close()
            self._engine = self._create_engine()
            self._lora_sessions = 0
            raise AdapterError(
                f"LiteRT-LM could not start a session with the LoRA file {lora} (its log above says why)"
            ) from None
        self._lora_sessions += lora is not None
        try:
            session.run_prefill(pieces)
        except RuntimeError as exc:
            session.close()
            raise EdgeGemmaError(f"LiteRT-LM failed to prefill the prompt: {exc}") from None
        return session

    def next_token(self, mask: TokenMask | None = None) -> int:
        while not self._pending:
            if self._generation is None:
                raise EdgeGemmaError("no sequence has been started")
            text = self._generation.next_piece()
            if text is None:  # the runtime stopped at one of its stop tokens
                info = self._generation.benchmark_info()
                self._runtime.update(
                    ttft_s=info.time_to_first_token_in_second,
                    decode_tokens=float(info.last_decode_token_count),
                    decode_tps=info.last_decode_tokens_per_second,
                )
                self._stop()
                return self._eos
            ids = self._piece_ids.get(text)
            if ids is None:
                ids = self._piece_ids[text] = self.tokenize(text)
                if len(self._piece_ids) > _PIECE_CACHE:
                    del self._piece_ids[next(iter(self._piece_ids))]
            self._pending.extend(ids)
        token = self._pending.popleft()
        if token == self._pad:
            # LiteRT-LM shows no logits; it emits the padding token when they are not finite.
            raise NumericalError(
                "LiteRT-LM produced the padding token, which it does when its logits are not "
                "finite (NaN or infinity); an adapter scale far too large for the model does this"
            )
        return token

    def _prompt_pieces(self, tokens: Sequence[int]) -> list[str]:
        """Texts whose separate tokenizations concatenate to exactly ``tokens``."""
        if not tokens:
            return [""]
        whole = self._text(tokens, spelled=True)
        if whole is not None and self.tokenize(whole) == list(tokens):
            return [whole]
        pieces, start = [], 0
        while start < len(tokens):
            # A byte token is not text on its own: grow the piece to a whole character.
            for end in range(start + 1, min(start + 5, len(tokens)) + 1):
                text = self._text(tokens[start:end], spelled=True)
                if text is not None and self.tokenize(text) == list(tokens[start:end]):
                    break
            else:
                raise InvalidParameterError(
                    f"token ids {list(tokens[start : start + 4])} at prompt position {start + 1} do not "
                    "spell text that LiteRT-LM tokenizes back to them; it takes prompts as text"
                )
            pieces.append(text)
            start = end
        return pieces

    def _text(self, tokens: Sequence[int], *, spelled: bool = False) -> str | None:
        """The text of ``tokens``; ``spelled``: special tokens as the text that stands for them."""
        spellings = self._spellings if spelled else {}
        try:
            return b"".join(spellings.get(t) or self.token_bytes(t) for t in tokens).decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _sampler(self, sampling: SamplingParams) -> litert_lm.SamplerConfig:
        if sampling.greedy:
            return litert_lm.SamplerConfig(top_k=1, top_p=1.0, temperature=0.0, seed=0)
        return litert_lm.SamplerConfig(
            top_k=sampling.top_k or self.info.vocab_size,
            top_p=sampling.top_p,
            temperature=sampling.temperature,
            seed=random.getrandbits(31) if sampling.seed is None else sampling.seed,
        )

    def runtime_stats(self) -> dict[str, float]:
        return dict(self._runtime)

    def _stop(self) -> None:
        self._pending.clear()
        if self._generation is not None:
            generation, self._generation = self._generation, None
            generation.close()

    def close(self) -> None:
        self._stop()
        self._engine.close()
        if self._scratch is not None:
            self._scratch.cleanup()


class _Generation:
    """One session's decode, streamed through a one-slot queue that holds the runtime back.

    The callback closes over the queue only (no reference cycle), so a generation that is
    dropped without :meth:`close` is still finalized, by refcount, before its engine. Open
    generations are closed at exit too: once the interpreter is finalizing, the decode
    thread can no longer run its Python callback, and deleting the session would wait on it
    forever.
    """

    def __init__(self, session: litert_lm.Session):
        self._session = session
        self._queue: queue.Queue[tuple[str | None, str | None, bool]] = queue.Queue(maxsize=1)
        self._stopped = threading.Event()
        self._done = False
        lib, chunks, stopped = session._lib, self._queue, self._stopped

        def on_chunk(_user_data: object, chunk: object) -> None:
            error = lib.litert_lm_stream_chunk_get_error(chunk)
            text = lib.litert_lm_stream_chunk_get_text(chunk)
            item = (
                text.decode("utf-8", errors="replace") if text else None,
                error.decode("utf-8", errors="replace") if error else None,
                bool(lib.litert_lm_stream_chunk_is_final(chunk)),
            )
            while not stopped.is_set():  # wait for the engine to read on, unless abandoned
                with contextlib.suppress(queue.Full):
                    chunks.put(item, timeout=0.1)
                    return

        self._callback = STREAM_CALLBACK_TYPE(on_chunk)  # the runtime calls it until the end
        if lib.litert_lm_session_run_decode_async(session._ptr, self._callback, None) != 0:
            session.close()
            raise EdgeGemmaError("LiteRT-LM could not start decoding")
        _OPEN.add(self)

    def next_piece(self) -> str | None:
        """The next text piece, or None when the runtime stopped at a stop token."""
        while not self._done:
            text, error, final = self._queue.get()
            self._done = final or error is not None
            if error is not None:
                if "max number of tokens" in error.lower():
                    raise ContextOverflowError(
                        f"LiteRT-LM ran out of context: {error}",
                        prompt_tokens=0,
                        max_tokens=None,
                        n_ctx=0,
                    )
                raise EdgeGemmaError(f"LiteRT-LM failed while decoding: {error}")
            if text:
                return text
        return None

    def benchmark_info(self) -> litert_lm.BenchmarkInfo:
        """The session's own timings; complete once the final piece has been read."""
        assert self._session is not None
        return self._session.get_benchmark_info()

    def close(self) -> None:
        if self._session is None:
            return
        if not self._done:
            self._session.cancel_process()
            self._stopped.set()  # a piece the decode thread still holds is dropped
        self._session.close()  # waits for the decode thread
        self._session = None

    def __del__(self) -> None:
        self.close()


_OPEN: weakref.WeakSet[_Generation] = weakref.WeakSet()


@atexit.register
def _close_open_generations() -> None:
    for generation in list(_OPEN):
        generation.close()


def _runtime_errors(text: str) -> str:
    """The error lines of LiteRT-LM's log (``E0000 ... file.cc:12] message``), messages only."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line[:1] in ("E", "F") and "] " in line and "supported_lora_ranks" not in line:
            found.append(line.split("] ", 1)[1])
    return "; ".join(found)


def _cache_dir(model: Path) -> Path:
    """The runtime's cache folder for ``model`` (XNNPACK weights, ~the model's size).

    Inside edgegemma's cache, never next to the user's model; one folder per model file
    (its path, size and mtime), so a rebuilt model does not find stale caches.
    """
    info = model.stat()
    identity = f"{model.resolve()}\0{info.st_size}\0{info.st_mtime_ns}".encode()
    folder = home() / "litert-cache" / hashlib.sha256(identity).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create LiteRT-LM's cache folder {folder}: {exc.strerror}; set EDGEGEMMA_HOME "
            "to a writable folder"
        ) from None
    return folder


def _built_bundle(gguf_path: Path) -> Path:
    """The cached LoRA-enabled ``.task`` built from a GGUF (``edgegemma convert ... --to litert``)."""
    folder = find_build(gguf_path, "litert", litert_options(lora_rank=16))
    if folder is None:
        raise ModelError(
            f"no LiteRT-LM build of {gguf_path.name} in the cache; build it with "
            f"`edgegemma convert {gguf_path} --to litert --lora-rank 16` "
            "(needs `pip install 'edgegemma[convert]'`, ~5 min and ~6 GB of memory)"
        )
    return folder / LITERT_FILES["task"]
