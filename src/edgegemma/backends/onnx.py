"""ONNX Runtime GenAI backend (``pip install 'edgegemma[onnx]'``).

A model is a folder with ``genai_config.json``, built by ``edgegemma convert MODEL --to
onnx``; opening the GGUF of a models.lock name finds that build in the cache. The runtime
evaluates tokens (``Generator.append_tokens``); tokens are chosen here from its logits, so
sampling means the same as on llama.cpp (top-k, top-p, min-p, temperature, repeat penalty,
seed), which the runtime's own search options cannot express.

LoRA: a model built with LoRA inputs takes ``.onnx_adapter`` files (the format lives in
:mod:`edgegemma.adapters.onnx`), activated per generator. The runtime applies one
adapter at a time and has no scale, so a set of adapters with scales is merged into one
adapter file: concatenating the LoRA ranks makes ``sum(scale_i * B_i @ A_i)`` exactly.

KV reuse: the sliding-window layers are given room for the whole context window
(``cache_slack``), so ``rewind_to`` can keep any prefix; if the runtime refuses anyway, the
sequence is recomputed. ``shift`` re-evaluates the kept tokens in a fresh generator.

Batches: a generator of ``batch_size`` rows evaluates one token of every row per pass. Its
rows must be prompts of one length: this runtime's attention (GroupQueryAttention with a
sliding-window cache) rejects padded prompts ("seqlens_k ... is too small"), and with the
sliding-window cache turned off in the graph padded rows come out wrong from their first
token. A batch generator takes its prompts in one ``append_tokens`` and then only
its own search's tokens, so the tokens chosen here are handed to it as logits that allow
nothing else (``set_logits``, then a greedy ``generate_next_token``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from ..adapters.onnx import lora_inputs, read_adapter, write_adapter
from ..builds import find_build
from ..chat import folder_template
from ..errors import (
    AdapterError,
    ContextOverflowError,
    ConversionError,
    EdgeGemmaError,
    InvalidParameterError,
    ModelError,
    NumericalError,
)
from ..families import family_of_model_type, require
from ..gguffile import read_header
from ..recipes import ONNX_OPTIONS, onnx_options
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
    log_probs,
    target_log_probs,
)

CONFIG_FILE = "genai_config.json"

_MERGED_KEPT = 4
"""Merged adapters kept loaded (each costs runtime memory as well as a file): one more set
of scales evicts the least recently used."""
_MIN_MAX_LENGTH = 512
"""The runtime refuses a KV capacity below the sliding window of Gemma 3."""
_END_TOKENS = ("<end_of_turn>", "</s>")
"""End generation besides eos, as llama.cpp decides for this vocabulary."""
_MAX_SEQUENCES = 8
"""Rows of one batch generator. Each holds its own KV cache of at least the sliding window,
so a row costs memory; throughput grows with the rows up to about this many
(docs/performance.md has the figures)."""
_NON_FINITE = (
    "ONNX Runtime computed non-finite logits (NaN or infinity); an adapter scale far too large "
    "for the model does this"
)


@dataclass
class _Adapter:
    name: str
    """Its name inside the runtime's ``Adapters``."""
    path: Path
    parameters: dict[str, np.ndarray]


class OnnxBackend(Backend):
    name = "onnx"
    features = Features(
        options=frozenset(ONNX_OPTIONS),
        score=True,
        batch=_MAX_SEQUENCES,
        batch_same_length=True,
        logits=True,
    )

    def __init__(self, path: Path, model: og.Model, config: dict, n_ctx: int, max_length: int):
        self._path = path
        self._model = model
        self._tokenizer = og.Tokenizer(model)
        self._max_length = max_length
        self._lora = lora_inputs(path)
        self._runtime_adapters = og.Adapters(model) if self._lora else None
        self._adapters: dict[str, _Adapter] = {}
        # Merged adapters (a set with scales) by their set, least recently used first.
        self._merged: OrderedDict[tuple[tuple[str, float], ...], tuple[str, Path]] = OrderedDict()
        self._names = iter(range(1, 1 << 62))
        self._scratch = tempfile.TemporaryDirectory(prefix="edgegemma-onnx-adapters-")
        self._generator: og.Generator | None = None
        self._active: str | None = None  # runtime adapter name of the current generator
        self._evaluated: list[int] = []
        self._pending: int | None = None
        self._logits: np.ndarray | None = None
        self._sampler: _Sampler | None = None
        facts = config["model"]
        self._pad = int(facts.get("pad_token_id", 0))
        eos = facts.get("eos_token_id", [])
        eog = set(eos if isinstance(eos, list) else [eos])
        eog.update(t for t in map(self._tokenizer.to_token_id, _END_TOKENS) if t >= 0)
        self._bytes = _TokenBytes(self._tokenizer, _special_tokens(path) | eog)
        lora = f"LoRA inputs on {len(self._lora)} projections" if self._lora else "no LoRA inputs"
        self.info = ModelInfo(
            architecture=family_of_model_type(facts["type"]).name,
            n_ctx=n_ctx,
            n_ctx_train=int(facts["context_length"]),
            vocab_size=int(facts["vocab_size"]),
            bos_id=facts.get("bos_token_id"),
            eog_ids=frozenset(eog),
            can_shift=True,
            description=f"{facts['type']} ONNX ({path.name}), {lora}",
            chat_template=folder_template(path),
        )

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG_FILE).is_file()

    @classmethod
    def open(cls, path: Path, options: BackendOptions) -> OnnxBackend:
        if path.is_file():
            require(read_header(path).architecture, "backend:onnx", path.name)  # before any build
            path = _built_model(path, options.extra)
        elif options.extra:
            raise InvalidParameterError(
                f"{', '.join(sorted(options.extra))} only apply when opening a GGUF"
            )
        if not cls.accepts(path):
            raise ModelError(f"{path} is not an ONNX Runtime GenAI model folder (no {CONFIG_FILE})")
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
            decoder = config["model"]["decoder"]
            n_ctx_train = int(config["model"]["context_length"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path / CONFIG_FILE} is unusable: {exc}") from None
        model_type = str(config["model"].get("type"))
        require(family_of_model_type(model_type, path).name, "backend:onnx", path)
        if options.n_ctx > n_ctx_train:
            raise InvalidParameterError(
                f"n_ctx={options.n_ctx} is larger than the {n_ctx_train} tokens {path.name} was trained for"
            )
        max_length = max(options.n_ctx, _MIN_MAX_LENGTH)
        session = {"intra_op_num_threads": options.n_threads, "inter_op_num_threads": 1}
        decoder_overlay: dict = {"session_options": session}
        window = decoder.get("sliding_window")
        if window:
            # Keep every position of the context in the sliding layers' cache: rewind_to can then
            # reuse any prefix (costs the same KV memory as a full-attention layer).
            window = dict(window, cache_slack=max(0, max_length - int(window["window_size"])))
            decoder_overlay["sliding_window"] = window
        try:
            runtime_config = og.Config(str(path))
            runtime_config.clear_providers()
            runtime_config.overlay(json.dumps({"model": {"decoder": decoder_overlay}}))
            model = og.Model(runtime_config)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime GenAI could not load {path}: {exc}") from exc
        try:
            return cls(path, model, config, options.n_ctx, max_length)
        except RuntimeError as exc:  # the runtime reads the tokenizer files only now
            raise ModelError(
                f"ONNX Runtime GenAI could not load the tokenizer of {path}: {exc}"
            ) from None

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def token_bytes(self, token: int) -> bytes:
        return self._bytes(token)

    # -- adapters --------------------------------------------------------------------------

    def load_adapter(self, path: Path) -> AdapterHandle:
        if not self._lora:
            raise AdapterError(
                f"{self._path.name} was built without LoRA inputs (--no-lora); rebuild it with "
                "`edgegemma convert MODEL --to onnx` to use adapters"
            )
        parameters = read_adapter(path, self._lora)
        name = self._load_runtime(path)
        self._adapters[name] = _Adapter(name, path, parameters)
        return name

    def free_adapter(self, handle: AdapterHandle) -> None:
        adapter = self._adapters.pop(handle)
        for key in [k for k in self._merged if any(name == handle for name, _ in k)]:
            self._forget_merged(key)
        self._unload_runtime(adapter.name)

    def _forget_merged(self, key: tuple[tuple[str, float], ...]) -> None:
        name, path = self._merged.pop(key)
        self._unload_runtime(name)
        path.unlink(missing_ok=True)

    def _load_runtime(self, path: Path) -> str:
        assert self._runtime_adapters is not None
        name = f"adapter-{next(self._names)}"
        try:
            self._runtime_adapters.load(str(path), name)
        except RuntimeError as exc:
            raise AdapterError(f"ONNX Runtime GenAI rejected {path.name}: {exc}") from exc
        return name

    def _unload_runtime(self, name: str) -> None:
        if self._active == name:  # the runtime refuses to unload an adapter in use
            self._drop_generator()
        assert self._runtime_adapters is not None
        self._runtime_adapters.unload(name)

    def _runtime_adapter(self, adapters: Sequence[tuple[AdapterHandle, float]]) -> str | None:
        """The runtime adapter that applies ``adapters``: one as it is, else a merged one."""
        if not adapters:
            return None
        if len(adapters) == 1 and adapters[0][1] == 1.0:
            return adapters[0][0]
        key = tuple(sorted((handle, float(scale)) for handle, scale in adapters))
        if key in self._merged:
            self._merged.move_to_end(key)
            return self._merged[key][0]
        while len(self._merged) >= _MERGED_KEPT:
            self._forget_merged(next(iter(self._merged)))
        path = Path(self._scratch.name) / f"merged-{next(self._names)}.onnx_adapter"
        write_adapter(path, self._merge(key))
        try:
            name = self._load_runtime(path)
        except AdapterError:
            path.unlink(missing_ok=True)
            raise
        self._merged[key] = (name, path)
        return name

    def _merge(self, key: tuple[tuple[str, float], ...]) -> dict[str, np.ndarray]:
        merged = {}
        for spec in self._lora.values():
            parts = [
                (
                    self._adapters[handle].parameters[spec.a],
                    self._adapters[handle].parameters[spec.b] * scale,
                )
                for handle, scale in key
                if spec.a in self._adapters[handle].parameters
            ]
            if parts:
                merged[spec.a] = np.concatenate([a for a, _ in parts], axis=1)
                merged[spec.b] = np.concatenate([b for _, b in parts], axis=0)
        return merged

    # -- generation ------------------------------------------------------------------------

    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        if len(tokens) > self._max_length:
            raise ContextOverflowError(
                f"{len(tokens)} tokens do not fit the KV cache of {self._max_length}",
                prompt_tokens=len(tokens),
                max_tokens=None,
                n_ctx=self.info.n_ctx,
            )
        adapter = self._runtime_adapter(adapters)
        self._pending = None
        keep = min(reuse, len(self._evaluated), len(tokens) - 1)
        if (
            self._generator is None
            or adapter != self._active
            or keep == 0
            or not self._rewind(keep)
        ):
            keep = 0
            self._new_generator(adapter)
        self._append(tokens[keep:])
        self._sampler = _Sampler(sampling, tokens)
        return keep

    def next_token(self, mask: TokenMask | None = None) -> int:
        if self._pending is not None:
            self._append([self._pending])
            self._pending = None
        assert self._generator is not None and self._sampler is not None
        logits = self._logits = self._generator.get_logits().reshape(-1)
        if mask is not None:
            apply_mask(logits, mask)
        token = self._sampler.sample(logits)
        if not math.isfinite(logits[token]):  # all-NaN logits pick token 0 and read as "length"
            raise NumericalError(_NON_FINITE)
        self._pending = token
        return token

    def logits(self) -> np.ndarray:
        assert self._logits is not None
        return self._logits

    def score(
        self,
        prompt: Sequence[int],
        continuations: Sequence[Sequence[int]],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[float]:
        # The graph gives the last position's logits only: a continuation is scored a token
        # at a time, then the sequence is rewound to the prompt for the next one.
        self.start(prompt, reuse=reuse, adapters=adapters, sampling=SamplingParams())
        assert self._generator is not None
        first = self._generator.get_logits().reshape(-1).copy()
        base = len(self._evaluated)
        scores = []
        for continuation in continuations:
            total, logits = 0.0, first
            for i, token in enumerate(continuation):
                total += float(log_probs(logits)[token])
                if i + 1 < len(continuation):
                    self._append([token])
                    logits = self._generator.get_logits().reshape(-1)
            if len(self._evaluated) > base and not self._rewind(base):
                adapter = self._active
                self._new_generator(adapter)
                self._append(list(prompt))
            scores.append(total)
        return scores

    def score_many(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        *,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[list[float]]:
        self._drop_generator()
        if any(len(continuation) > 1 for continuation in continuations):
            # A batch's rows cannot be rewound to branch: a continuation of several tokens
            # is scored after each prompt on its own.
            scores = [self.score(p, continuations, reuse=0, adapters=adapters) for p in prompts]
            self._drop_generator()
            return scores
        generator = self._new_batch(
            self._runtime_adapter(adapters), len(prompts), len(prompts[0]) + 1
        )
        self._run(lambda: generator.append_tokens(np.asarray(prompts, dtype=np.int32)))
        logits = generator.get_logits().reshape(len(prompts), -1)
        firsts = [[continuation[0] for continuation in continuations]] * len(prompts)
        return [[float(v) for v in row] for row in target_log_probs(logits, firsts)]

    def batch(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> list[BatchedSequence]:
        self._drop_generator()
        generator = self._new_batch(
            self._runtime_adapter(adapters), len(prompts), len(prompts[0]) + max_tokens + 1
        )
        run = _Batch(self, generator, prompts, sampling)
        return [BatchRow(run, i) for i in range(len(prompts))]

    def _new_batch(self, adapter: str | None, rows: int, length: int) -> og.Generator:
        """A generator of ``rows`` sequences of up to ``length`` tokens each."""
        params = og.GeneratorParams(self._model)
        params.set_search_options(
            max_length=max(length, _MIN_MAX_LENGTH), batch_size=rows, do_sample=False
        )
        generator = og.Generator(self._model, params)
        if adapter is not None:
            generator.set_active_adapter(self._runtime_adapters, adapter)
        return generator

    def _run(self, step: Callable[[], object]) -> None:
        """Run the model through ``step``, with a runtime failure reported as edgegemma's."""
        try:
            step()
        except Exception as exc:
            # A graph that does not match its genai_config.json fails only when it runs.
            raise ModelError(f"ONNX Runtime GenAI could not run {self._path.name}: {exc}") from exc

    def shift(self, keep: int, discard: int) -> None:
        kept = self._evaluated[:keep] + self._evaluated[keep + discard :]
        pending = self._pending
        self._new_generator(self._active)
        self._append(kept)
        self._pending = pending

    def _rewind(self, keep: int) -> bool:
        assert self._generator is not None
        try:
            self._generator.rewind_to(keep)
        except RuntimeError:  # e.g. the sliding window evicted what a rewind would need
            return False
        del self._evaluated[keep:]
        return True

    def _new_generator(self, adapter: str | None) -> None:
        self._drop_generator()
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=self._max_length)
        generator = og.Generator(self._model, params)
        if adapter is not None:
            generator.set_active_adapter(self._runtime_adapters, adapter)
        self._generator = generator
        self._active = adapter

    def _drop_generator(self) -> None:
        self._generator = None
        self._active = None
        self._evaluated = []
        self._pending = None

    def _append(self, tokens: Sequence[int]) -> None:
        generator = self._generator
        assert generator is not None
        try:
            self._run(lambda: generator.append_tokens(np.asarray(tokens, dtype=np.int32)))
        except ModelError:
            self._drop_generator()  # its state is unknown now
            raise
        self._evaluated.extend(tokens)

    def close(self) -> None:
        self._drop_generator()
        if self._runtime_adapters is not None:
            for name in [*(name for name, _ in self._merged.values()), *self._adapters]:
                self._runtime_adapters.unload(name)
        self._merged.clear()
        self._adapters.clear()
        self._runtime_adapters = None
        self._scratch.cleanup()
        del self._tokenizer
        del self._model


def _built_model(gguf_path: Path, extra: Mapping[str, object]) -> Path:
    """The cached ONNX build of a GGUF (``edgegemma convert ... --to onnx``)."""
    try:
        options = onnx_options(**extra)  # type: ignore[arg-type]
    except ConversionError as exc:
        raise InvalidParameterError(str(exc)) from None
    found = find_build(gguf_path, "onnx", options)
    if found is None:
        flags = "".join(
            f" --{name.replace('_', '-')} {value}"
            for name, value in options.items()
            if value != onnx_options()[name] and not (name == "quant_method" and value == "none")
        )
        raise ModelError(
            f"no ONNX build of {gguf_path.name} with {options} in the cache; build it with "
            f"`edgegemma convert {gguf_path} --to onnx{flags}` (needs `pip install 'edgegemma[convert]'`)"
        )
    return found


def _special_tokens(model_dir: Path) -> set[int]:
    """Ids of the tokenizer's special added tokens (``<bos>``, ``<start_of_turn>``, ...)."""
    path = model_dir / "tokenizer.json"
    try:
        # Only the added_tokens list near the top is parsed: the whole file as a str and a
        # JSON tree would raise the process's peak memory many times over the file's size.
        data = path.read_bytes()
        start = data.index(b"[", data.index(b'"added_tokens"'))
        window = 1 << 20
        while True:
            text = data[start : start + window].decode("utf-8", errors="ignore")
            try:
                added, _ = json.JSONDecoder().raw_decode(text)
                break
            except ValueError:
                if start + window >= len(data):
                    raise
                window *= 4
        return {int(token["id"]) for token in added if token.get("special")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot read the special tokens of {path}: {exc}") from None


class _Batch:
    """The sequences of one :meth:`OnnxBackend.batch`: rows of one generator. The engine
    drives them in lockstep; when a sequence wants its next token after every live row
    has chosen one, the chosen tokens go to the runtime together and one pass evaluates them
    all. A finished row is fed the padding token, which the runtime masks out."""

    def __init__(
        self,
        backend: OnnxBackend,
        generator: og.Generator,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
    ):
        self.backend = backend
        self.generator: og.Generator | None = generator
        self.prompts: np.ndarray | None = np.asarray(prompts, dtype=np.int32)
        self.samplers = [_Sampler(sampling, prompt) for prompt in prompts]
        rows = len(prompts)
        self.live = set(range(rows))
        self.unsampled: set[int] = set()
        """Live rows whose newest logits have not been sampled from yet."""
        self.logits: np.ndarray | None = None
        self.chosen_from: dict[int, np.ndarray] = {}
        self.chosen = np.full(rows, backend._pad, dtype=np.int64)
        # Logits that allow only each row's chosen token: updated in place, two cells a row.
        self.forced = np.full((rows, backend.info.vocab_size), -np.inf, dtype=np.float32)
        self.forced[np.arange(rows), self.chosen] = 0.0

    def sample(self, row: int, mask: TokenMask | None) -> int:
        if row not in self.unsampled:
            self._evaluate()
        self.unsampled.discard(row)
        assert self.logits is not None
        logits = self.logits[row]
        if mask is not None:
            apply_mask(logits, mask)
        token = self.samplers[row].sample(logits)
        if not math.isfinite(logits[token]):
            raise NumericalError(_NON_FINITE)
        self.chosen_from[row] = logits
        self._choose(row, token)
        return token

    def finish(self, row: int) -> None:
        self.live.discard(row)
        self.unsampled.discard(row)
        self.chosen_from.pop(row, None)
        self._choose(row, self.backend._pad)
        if not self.live:
            self.generator = None  # frees its KV cache

    def _choose(self, row: int, token: int) -> None:
        self.forced[row, self.chosen[row]] = -np.inf
        self.forced[row, token] = 0.0
        self.chosen[row] = token

    def _evaluate(self) -> None:
        if self.unsampled:
            # A live row has logits it has not sampled from, which this pass would replace:
            # the engine broke the lockstep.
            raise EdgeGemmaError("batched sequences were driven out of step")
        generator = self.generator
        assert generator is not None
        if self.prompts is not None:
            prompts = self.prompts
            self.backend._run(lambda: generator.append_tokens(prompts))
            self.prompts = None
        else:
            # The greedy search picks the one token each row's logits allow.
            generator.set_logits(self.forced)
            self.backend._run(generator.generate_next_token)
        self.logits = generator.get_logits().reshape(len(self.samplers), -1)
        self.unsampled = set(self.live)


class _TokenBytes:
    """Bytes of single tokens, as llama.cpp renders them.

    Byte-fallback tokens (``<0xNN>``) are one raw byte (the runtime's decode would give
    U+FFFD for half a character); special and end-of-generation tokens are empty.
    """

    def __init__(self, tokenizer: og.Tokenizer, special: set[int]):
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = dict.fromkeys(special, b"")
        for value in range(256):
            token = tokenizer.to_token_id(f"<0x{value:02X}>")
            if token >= 0:
                self._cache[token] = bytes([value])

    def __call__(self, token: int) -> bytes:
        piece = self._cache.get(token)
        if piece is None:
            piece = self._cache[token] = self._tokenizer.decode(
                np.asarray([token], dtype=np.int32)
            ).encode()
        return piece


class _Sampler:
    """llama.cpp's sampler chain in numpy: penalties, then greedy or top-k, top-p, min-p, temp, draw."""

    def __init__(self, params: SamplingParams, history: Sequence[int]):
        self._params = params
        self._recent = list(history[-params.repeat_last_n :]) if params.repeat_last_n else []
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        p = self._params
        if p.greedy and p.repeat_penalty == 1.0:
            return int(np.argmax(logits))  # no copy: the runtime's array is ours already
        logits = logits.astype(np.float32, copy=True)
        if p.repeat_penalty != 1.0 and self._recent:
            seen = np.unique(np.asarray(self._recent))
            values = logits[seen]
            logits[seen] = np.where(
                values > 0, values / p.repeat_penalty, values * p.repeat_penalty
            )
        if p.greedy:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits)
        if p.repeat_last_n:
            self._recent.append(token)
            del self._recent[: -p.repeat_last_n]
        return token

    def _draw(self, logits: np.ndarray) -> int:
        p = self._params
        if 0 < p.top_k < logits.size:
            candidates = np.argpartition(logits, -p.top_k)[-p.top_k :]
        else:
            candidates = np.arange(logits.size)
        candidates = candidates[np.argsort(-logits[candidates], kind="stable")]
        values = logits[candidates].astype(np.float64)
        probs = _softmax(values)
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            candidates, values, probs = candidates[:cut], values[:cut], probs[:cut]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            candidates, values = candidates[keep], values[keep]
        final = _softmax(values / p.temperature)
        return int(candidates[self._rng.choice(len(candidates), p=final)])


def _softmax(values: np.ndarray) -> np.ndarray:
    exp = np.exp(values - values.max())
    return exp / exp.sum()
