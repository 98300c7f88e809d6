"""What the backend's KV cache holds, and how much of it a new call may reuse."""

from __future__ import annotations

from collections.abc import Sequence

from .options import Bound

AdapterKey = tuple[tuple[int, float], ...]


def adapter_key(bound: Bound) -> AdapterKey:
    """What the KV cache is keyed by: each adapter's load (not its name) and scale."""
    return tuple(sorted((loaded.uid, scale) for loaded, scale in bound))


class PrefixCache:
    """The token prefix held in the backend's KV cache, the adapter set it was computed under,
    and how many of its tokens were evaluated as a prompt.

    The invariant: whatever this records is exactly what the backend holds, or it records
    nothing. Every change the backend's cache may undergo (a call starting, a batch, a
    shift, an adapter freed, a failure) is preceded by :meth:`forget`, and :meth:`record`
    follows only once the backend holds those tokens. Reuse is then allowed only under the
    very same adapter set (:func:`adapter_key`) and, with the ``"exact"`` policy, only where
    the runtime computes a reused prefix bit-identically to a fresh evaluation.
    """

    def __init__(self, policy: str, *, exact_reuse: bool, exact_reuse_with_adapters: bool):
        self.policy = policy
        self._exact_reuse = exact_reuse
        self._exact_reuse_with_adapters = exact_reuse_with_adapters
        self._tokens: list[int] = []
        self._key: AdapterKey = ()
        # How many of them were evaluated as a prompt. Generated tokens were evaluated one at
        # a time, and a runtime's one-row kernels round differently from its batched ones
        # (llama.cpp's repacked matmuls do): a fresh evaluation of the same text, batched,
        # gets other keys and values for them, so "exact" does not reuse them.
        self._prompt = 0

    def forget(self) -> None:
        self._tokens, self._key, self._prompt = [], (), 0

    def record(self, tokens: list[int], key: AdapterKey) -> None:
        """The backend now holds ``tokens``, all evaluated as a prompt. A generation passes
        its own list, which grows with the tokens it generates (the cache's tokens too)."""
        self._tokens, self._key, self._prompt = tokens, key, len(tokens)

    def reusable(self, tokens: Sequence[int], key: AdapterKey) -> int:
        """How many leading ``tokens`` the backend may take from its KV cache."""
        if key != self._key:
            return 0
        limit = len(tokens) - 1  # the last token is evaluated again: its logits are needed
        if self.policy != "always":
            exact = self._exact_reuse_with_adapters if key else self._exact_reuse
            if not exact:
                return 0
            limit = min(limit, self._prompt)
        return min(common_prefix(self._tokens, tokens), limit)

    def computed_with(self, uid: int) -> bool:
        """Whether the cached tokens were computed with the adapter loaded as ``uid``."""
        return any(cached == uid for cached, _ in self._key)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
