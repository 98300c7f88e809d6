"""A scripted backend: no model, answers chosen by a function. For tests of engine policy.

Like httpx's ``MockTransport``, it implements the whole backend interface with plain Python,
so that what the engine does above a backend -- context budget, overflow, stop strings across
token boundaries, the KV cache key, adapter bookkeeping, cancellation, threads -- can be
tested fast and exhaustively. It is not registered as a backend users can load; build an
engine on it directly::

    from edgegemma import Engine
    from edgegemma.backends.scripted import ScriptedBackend

    engine = Engine(ScriptedBackend(reply=lambda prompt, adapters: "hello"), model_path=Path("scripted"))

Tokens are bytes: ids 0-255 are the bytes of UTF-8 text, then BOS and EOS. ``reply`` gets the
prompt's text and the adapter set as ``{adapter file name: scale}`` and returns the text to
generate; the backend then emits its bytes one token at a time and EOS after them (or keeps
repeating the reply when ``end=False``). Every call is recorded in :attr:`calls` so a test can
check what the engine asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterError
from ..sampling import OPTIONAL_SAMPLING, SamplingParams
from .base import (
    AdapterHandle,
    Backend,
    BackendOptions,
    BatchedSequence,
    Features,
    ModelInfo,
    TokenMask,
)

BOS = 256
EOS = 257
VOCAB_SIZE = 258

Reply = Callable[[str, dict[str, float]], str]


@dataclass
class Call:
    """One call the engine made on the backend."""

    method: str
    args: dict[str, Any] = field(default_factory=dict)


class ScriptedBackend(Backend):
    name = "scripted"
    features = Features(
        options=frozenset(),
        sampling=frozenset(OPTIONAL_SAMPLING),
        score=True,
        batch=8,
        batch_min=4,
        batch_join=True,
        adjustable_threads=True,
    )

    def __init__(
        self,
        reply: Reply = lambda prompt, adapters: "",
        *,
        n_ctx: int = 256,
        end: bool = True,
        token_delay_s: float = 0.0,
        failing_adapters: Sequence[str] = (),
        chat_template: str | None = None,
    ):
        self._reply = reply
        self._end = end
        self._delay = token_delay_s
        self._failing = set(failing_adapters)
        self.calls: list[Call] = []
        self.cache: list[int] = []
        """The tokens whose "KV" the backend holds."""
        self.threads: int | None = None
        self.loaded: dict[int, Path] = {}
        self._ids = iter(range(1, 1 << 62))
        self._pending: list[int] = []
        self._steps: dict[int, int] = {}  # the running batch: rounds each live sequence is at
        self._batch_adapters: dict[str, float] = {}
        self.closed = False
        self.info = ModelInfo(
            architecture="scripted",
            n_ctx=n_ctx,
            n_ctx_train=n_ctx,
            vocab_size=VOCAB_SIZE,
            bos_id=BOS,
            eog_ids=frozenset({EOS}),
            can_shift=True,
            exact_reuse=True,
            exact_reuse_with_adapters=True,
            description="scripted test backend",
            chat_template=chat_template,
        )

    @classmethod
    def open(cls, path: Path, options: BackendOptions) -> ScriptedBackend:
        return cls(n_ctx=options.n_ctx)

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def load_adapter(self, path: Path) -> AdapterHandle:
        self.calls.append(Call("load_adapter", {"path": path}))
        if path.name in self._failing:
            raise AdapterError(f"{path.name} is scripted to fail")
        handle = next(self._ids)
        self.loaded[handle] = path
        return handle

    def free_adapter(self, handle: AdapterHandle) -> None:
        self.calls.append(Call("free_adapter", {"path": self.loaded[handle]}))
        del self.loaded[handle]

    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        adapter_set = {self.loaded[h].name: scale for h, scale in adapters}
        keep = min(reuse, len(self.cache), len(tokens) - 1)
        self.calls.append(
            Call(
                "start",
                {
                    "tokens": list(tokens),
                    "reuse": reuse,
                    "kept": keep,
                    "adapters": adapter_set,
                    "sampling": sampling,
                },
            )
        )
        if self.cache[:keep] != list(tokens[:keep]):
            raise AssertionError(
                "the engine promised a reusable prefix that the cache does not hold"
            )
        self.cache = list(tokens)
        self._pending = self._answer(tokens, adapter_set)
        return keep

    def next_token(self, mask: TokenMask | None = None) -> int:
        if self._delay:
            time.sleep(self._delay)
        token = self._pending.pop(0) if self._pending else EOS
        self.cache.append(token)
        return token

    def score(
        self,
        prompt: Sequence[int],
        continuations: Sequence[Sequence[int]],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[float]:
        """Each token's log-probability is -1 - (its id % 7) / 7: deterministic and easy to check."""
        self.start(prompt, reuse=reuse, adapters=adapters, sampling=SamplingParams())
        self._pending = []
        return [float(sum(-1.0 - (t % 7) / 7 for t in c)) for c in continuations]

    def score_many(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        *,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[list[float]]:
        self._check_lengths(prompts)
        self.calls.append(Call("score_many", {"prompts": [list(p) for p in prompts]}))
        scores = [self.score(p, continuations, reuse=0, adapters=adapters) for p in prompts]
        self.cache = []
        return scores

    def batch(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> list[BatchedSequence]:
        """Sequences answering as :meth:`start` would; they fail the test if the engine
        drives one a token ahead of another (a real batch evaluates them in one pass) or
        past ``max_tokens``."""
        self._check_lengths(prompts)
        if not prompts or len(prompts) > self.features.batch:
            raise AssertionError(f"a batch of {len(prompts)} sequences")
        adapter_set = {self.loaded[h].name: scale for h, scale in adapters}
        self.calls.append(
            Call("batch", {"prompts": [list(p) for p in prompts], "max_tokens": max_tokens})
        )
        self.cache = []
        self._steps = {}
        self._batch_adapters = adapter_set
        return [self._sequence(prompt, max_tokens) for prompt in prompts]

    def join(self, prompt: Sequence[int], *, max_tokens: int) -> BatchedSequence:
        """A sequence added to the running batch; it fails the test if the engine adds it
        in the middle of a round or beyond the batch size."""
        if len(set(self._steps.values())) > 1:
            raise AssertionError("the engine added a sequence in the middle of a round")
        if len(self._steps) >= self.features.batch:
            raise AssertionError(f"a sequence joined a batch of {len(self._steps)}")
        self.calls.append(Call("join", {"prompt": list(prompt), "max_tokens": max_tokens}))
        return self._sequence(prompt, max_tokens)

    def _sequence(self, prompt: Sequence[int], max_tokens: int) -> _ScriptedSequence:
        answer = self._answer(prompt, self._batch_adapters)
        return _ScriptedSequence(answer, self._steps, next(self._ids), max_tokens)

    def _check_lengths(self, prompts: Sequence[Sequence[int]]) -> None:
        if self.features.batch_same_length and len({len(p) for p in prompts}) > 1:
            raise AssertionError("the engine batched prompts of different lengths")

    def _answer(self, tokens: Sequence[int], adapter_set: dict[str, float]) -> list[int]:
        text = bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
        answer = list(self._reply(text, adapter_set).encode("utf-8"))
        return answer + [EOS] if self._end else answer * 1000 or [EOS]

    def shift(self, keep: int, discard: int) -> None:
        self.calls.append(Call("shift", {"keep": keep, "discard": discard}))
        del self.cache[keep : keep + discard]

    def set_threads(self, n_threads: int) -> None:
        self.calls.append(Call("set_threads", {"n_threads": n_threads}))
        self.threads = n_threads

    def close(self) -> None:
        self.calls.append(Call("close"))
        self.closed = True


class _ScriptedSequence(BatchedSequence):
    def __init__(self, answer: list[int], steps: dict[int, int], index: int, max_tokens: int):
        self._answer = answer
        self._steps = steps  # the round each unfinished sequence of the batch is at
        self._index = index
        self._max_tokens = max_tokens
        self._taken = 0
        steps[index] = min(steps.values(), default=0)

    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        return 0

    def next_token(self, mask: TokenMask | None = None) -> int:
        if self._steps[self._index] > min(self._steps.values()):
            raise AssertionError("the engine drove a batched sequence a token ahead of another")
        if self._taken >= self._max_tokens:
            raise AssertionError("the engine drove a batched sequence past max_tokens")
        self._taken += 1
        self._steps[self._index] += 1
        return self._answer.pop(0) if self._answer else EOS

    def logits(self) -> np.ndarray:
        raise NotImplementedError("the scripted backend shows no logits")

    def finish(self) -> None:
        self._steps.pop(self._index, None)
