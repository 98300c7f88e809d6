"""The Engine: one API over every backend, and the policy they all share.

Context budget, stop strings, statistics, adapter bookkeeping and parameter checks are written
here once; backends (see :mod:`edgegemma.backends`) only evaluate tokens. What a call returns
is in :mod:`.results`, its options in :mod:`.options`, a running generation in
:mod:`.streams`, batches in :mod:`.batching`, likelihood answers in :mod:`.scoring` and the KV
cache's reuse in :mod:`.prefix_cache`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self, TypeVar, Unpack

from . import decisions, scoring
from .backends import backend_for_path, get_backend
from .backends.base import (
    Backend,
    BackendOptions,
    BatchedSequence,
    Features,
    ModelInfo,
    round_n_ctx,
)
from .batching import Together
from .chat import (
    ChatTemplate,
    Message,
    check_messages,
    fit_conversation,
    gemma_template,
)
from .constraints import Matcher, Vocabulary, make_constraint
from .decisions import Decisions, Questions
from .errors import (
    BackendUnavailableError,
    ContextOverflowError,
    EdgeGemmaError,
    EngineBusyError,
    EngineClosedError,
    InvalidParameterError,
)
from .families import FAMILIES, require
from .loaded_adapters import Bound, LoadedAdapters, adapter_file
from .options import (
    DEFAULT_MAX_TOKENS,
    ENGINE_ADAPTERS,
    SAMPLING_OPTIONS,
    ChatOptions,
    Fitted,
    GenerateOptions,
    OverflowPolicy,
    PrefixCachePolicy,
    Request,
    _EngineAdapters,
    check_batch,
    check_ids,
    check_logprobs,
    check_max_tokens,
    check_option_names,
    check_policy,
    check_prefix_cache,
    check_prompt,
    check_stop,
    check_text,
    check_timeout,
    handles,
    protected_length,
)
from .prefix_cache import PrefixCache, adapter_key, common_prefix
from .results import Classification, Perplexity, Result, TokenLogprob
from .sampling import OPTIONAL_SAMPLING, SamplingParams
from .streams import Holder, Progress, Stream, TextAssembler, token_logprob
from .threads import ThreadPolicy, default_threads, usable_cores

_T = TypeVar("_T")
_Adapters = Mapping[str, float] | None | _EngineAdapters
log = logging.getLogger("edgegemma")

GEMMA_BOS, GEMMA_EOS = "<bos>", "<eos>"
"""The special-token texts chat templates are rendered with (Gemma's vocabulary)."""
HELDOUT_TEXT = Path(__file__).with_name("data") / "heldout-en.txt"
"""An English text written for edgegemma (so no model has seen it) that the perplexity of a
model is measured on by default: 3084 tokens for Gemma 3, three windows of 1024."""


class Engine:
    """A loaded base model on one backend, with LoRA adapters swapped at runtime.

    Create it with :func:`edgegemma.load`. Calls from several threads are serialized: one
    generation runs at a time. With ``prefix_cache="exact"`` (the default) a call's answer does
    not depend on earlier calls: a cached prompt prefix is reused only where the runtime
    computes it bit-identically to a fresh evaluation; ``"always"`` reuses it everywhere.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        model_path: Path,
        on_overflow: str = "error",
        prefix_cache: str = "exact",
        threads: ThreadPolicy | None = None,
    ):
        check_policy(on_overflow)
        check_prefix_cache(prefix_cache)
        self._backend = backend
        self.model_path = model_path
        # None: the backend keeps the thread count it was opened with.
        self._threads = (
            threads if threads is not None and backend.features.adjustable_threads else None
        )
        self._n_threads = self._threads.limit if self._threads is not None else 0
        self.on_overflow = on_overflow
        self._adapters = LoadedAdapters()
        self._active: dict[str, float] = {}
        self._cache = PrefixCache(
            prefix_cache,
            exact_reuse=backend.info.exact_reuse,
            exact_reuse_with_adapters=backend.info.exact_reuse_with_adapters,
        )
        self._lock = threading.Lock()
        """Held by every generation and every change of the backend: one at a time."""
        self._state = threading.Lock()
        """Guards the holder, a pending close and a request's release (short sections only)."""
        self._holder: weakref.ReferenceType[Holder] | None = None
        self._close_pending = False
        self._closed = False
        self._vocab: Vocabulary | None = None
        self._chat_template: ChatTemplate | None = None

    # -- model facts ---------------------------------------------------------------------

    @property
    def prefix_cache(self) -> str:
        """``"exact"`` or ``"always"``: when a cached prompt prefix is reused (:func:`load`)."""
        return self._cache.policy

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def info(self) -> ModelInfo:
        return self._backend.info

    @property
    def features(self) -> Features:
        """What the backend supports beyond generating: classify and perplexity (``score``),
        constrained output and logprobs (``logits``), its load options."""
        return self._backend.features

    @property
    def n_ctx(self) -> int:
        """Tokens of context (prompt plus generated) this engine holds."""
        return self._backend.info.n_ctx

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` as the engine feeds them to the model."""
        checked = check_text(text)
        with self._reading():
            ids = self._backend.tokenize(checked)
        bos = self._backend.info.bos_id
        return [bos, *ids] if add_bos and bos is not None else ids

    def detokenize(self, token_ids: Sequence[int]) -> str:
        with self._reading():
            data = b"".join(
                self._backend.token_bytes(t) for t in check_ids(token_ids, self.info.vocab_size)
            )
        return data.decode("utf-8", errors="replace")

    # -- adapters ------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, Path]:
        """Loaded adapters by name."""
        return self._adapters.paths()

    @property
    def active_adapters(self) -> dict[str, float]:
        """The engine's adapter set: used by every call that does not pass ``adapters=``."""
        return dict(self._active)

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Load a LoRA adapter file under ``name``; the base model is not reloaded."""
        self._load_adapter(name, path, replace=False)

    def replace_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Load ``path`` as the new version of the loaded adapter ``name`` (in the active set
        or not): calls made before keep the old one, calls after get the new, and the old is
        freed after its last call. If the new one fails to load, the old one stays."""
        self._load_adapter(name, path, replace=True)

    def _load_adapter(self, name: str, path: str | os.PathLike[str], *, replace: bool) -> None:
        adapter_path = adapter_file(name, path)
        with self._exclusive():
            self._free_doomed()
            if (name in self._adapters) != replace:
                raise self._adapters.misnamed(name, replace)
            handle = self._backend.load_adapter(adapter_path)
            (self._adapters.replace if replace else self._adapters.add)(name, adapter_path, handle)
            self._free_doomed()
        log.debug("loaded adapter %s from %s", name, adapter_path)

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter. It must not be in the engine's active set.

        The name is free at once: later calls cannot use it, and another adapter may be loaded
        under it. Calls already made with the adapter (a stream not yet finished, a call
        waiting for the engine) still run with it; its memory is freed when the last of them
        ends.
        """
        with self._exclusive():
            self._adapters.remove(name, self._active)
            self._free_doomed()

    def set_adapters(self, adapters: Mapping[str, float] | None) -> None:
        """Make ``{name: scale}`` the engine's adapter set; ``None`` or ``{}`` is the bare base."""
        checked = self._adapters.checked(adapters)
        with self._exclusive():
            self._active = checked

    # -- generation ----------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], **options: Unpack[GenerateOptions]) -> Result:
        """Generate a continuation of ``prompt`` (text, or token ids taken as they are).

        The options (all keyword-only, see :class:`~edgegemma.options.GenerateOptions`):
        ``max_tokens`` (256; None: until an end token or a full context window), the sampling
        settings (greedy by default), ``stop`` strings, ``adapters`` for this call only,
        ``on_overflow`` and ``keep`` (the context policy and the prompt prefix it never
        drops), ``timeout`` (seconds; ends with finish_reason ``"timeout"`` and the text so
        far), ``choices``/``regex``/``json_schema`` (constrained output, ending when the answer
        is complete; one not completed within ``max_tokens`` ends with finish_reason
        ``"length"`` and says so in ``finish_detail``) and ``logprobs=k``. Constraints and
        logprobs need a backend that shows its logits (llamacpp, onnx).
        """
        check_option_names(options, "generate")
        stream = self.stream(prompt, **options)
        with stream:
            for _ in stream:
                pass
        return stream.result

    def stream(self, prompt: str | Sequence[int], **options: Unpack[GenerateOptions]) -> Stream:
        """Like :meth:`generate`, but yields text pieces as they are produced."""
        check_option_names(options, "stream")
        self._check_open()
        sampling = SamplingParams(**{k: options[k] for k in SAMPLING_OPTIONS if k in options})  # type: ignore[literal-required]
        max_tokens = options.get("max_tokens", DEFAULT_MAX_TOKENS)
        check_max_tokens(max_tokens)
        asked = options.get("on_overflow")
        policy: str = self.on_overflow if asked is None else asked
        check_policy(policy)
        self._check_backend_can(sampling, policy, max_tokens)
        stops = check_stop(options.get("stop", ()))
        timeout = options.get("timeout")
        check_timeout(timeout)
        constraint = make_constraint(
            options.get("choices"), options.get("regex"), options.get("json_schema")
        )
        logprobs = options.get("logprobs")
        check_logprobs(logprobs)
        if (constraint is not None or logprobs is not None) and not self.features.logits:
            what = "constrained output" if constraint is not None else "logprobs"
            raise BackendUnavailableError(
                f"the {self.backend_name} backend shows no logits, so it has no {what} "
                "(it is available on llamacpp and onnx)"
            )
        active = self._adapter_set(options.get("adapters", ENGINE_ADAPTERS))
        prompt_ids = check_prompt(prompt, self.tokenize, self.info.vocab_size)
        request = Request(
            prompt_ids=prompt_ids,
            protected=protected_length(
                prompt,
                prompt_ids,
                options.get("keep", 0),
                self.tokenize,
                has_bos=self.info.bos_id is not None,
            ),
            max_tokens=max_tokens,
            sampling=sampling,
            stop=stops,
            adapters=dict(active),
            bound=[],
            on_overflow=policy,
            timeout=timeout,
            constraint=constraint,
            logprobs=logprobs,
        )
        # A request that cannot fit the context fails here, alone, rather than in the middle of
        # run_together with others.
        self._fit_context(request, self.n_ctx)
        request.bound = self._adapters.bind(active)
        return Stream(self, request, self._generate)

    def _check_backend_can(
        self, sampling: SamplingParams, policy: str, max_tokens: int | None
    ) -> None:
        if policy == "shift" and max_tokens is None:
            raise InvalidParameterError('on_overflow="shift" needs a finite max_tokens')
        unsupported = sampling.optional_in_use() - self.features.sampling
        if unsupported:
            raise InvalidParameterError(
                f"the {self.backend_name} backend has no {' or '.join(sorted(unsupported))}; "
                f"leave {', '.join(f'{n}={OPTIONAL_SAMPLING[n]}' for n in sorted(unsupported))}"
            )
        if policy == "shift" and not self.info.can_shift:
            raise InvalidParameterError(
                f"the {self.backend_name} backend cannot shift its context; "
                'use on_overflow="truncate_left" or "error"'
            )

    def generate_many(
        self, prompts: Sequence[str | Sequence[int]], **options: Unpack[GenerateOptions]
    ) -> list[Result]:
        """:meth:`generate` for each prompt with the same options.

        Where the backend evaluates several sequences together (llama.cpp, and ONNX Runtime
        GenAI for prompts of the same length), the prompts run as one batch, each pass of the
        model taking one token of each; as many go together as the backend holds and the
        context window fits (every prompt with its ``max_tokens``). Elsewhere they run one
        after another. Stop strings, constraints, logprobs, timeouts and stats apply to each
        sequence as to one call.
        """
        batch = check_batch(prompts)
        check_option_names(options, "generate_many")
        streams = [self.stream(prompt, **options) for prompt in batch]
        for _ in self.run_together(streams):
            pass
        return [stream.result for stream in streams]

    def run_together(self, streams: Sequence[Stream], *, batch_min: int | None = None) -> Together:
        """Run streams made by :meth:`stream` or :meth:`stream_chat` (not yet iterated) as
        :meth:`generate_many` runs its prompts; iterate the returned :class:`Together` for
        ``(index, text)`` as the stream at ``index`` produces text. Afterwards each stream's
        ``result`` holds its Result; :meth:`Together.add` brings in more streams while they
        run.

        Streams with the same adapter set and sampling settings run together; the others
        one group after another, the group of the stream waiting longest first. Closing a
        stream between two pieces cancels it, the others go on (one not started yet never
        starts and has no result); closing the iterator cancels the streams running then (the
        streams not yet started are left without a result).
        The engine is held until the iterator is exhausted or closed.

        ``batch_min`` is the fewest streams of a kind that run as a batch; fewer run one by
        one. By default the backend's ``features.batch_min``, below which it measured a batch
        no faster; a caller that will :meth:`Together.add` streams (a server) may pass 1, so
        that a stream running alone is a batch that later ones can join.
        """
        if batch_min is not None and (
            isinstance(batch_min, bool) or not isinstance(batch_min, int) or batch_min < 1
        ):
            raise InvalidParameterError(f"batch_min must be a positive integer, got {batch_min!r}")
        return Together(self, self._backend, streams, batch_min or self.features.batch_min)

    # -- scoring -------------------------------------------------------------------------

    def perplexity(
        self,
        text: str,
        *,
        window: int = 1024,
        adapters: _Adapters = ENGINE_ADAPTERS,
    ) -> Perplexity:
        """The model's perplexity on ``text``, the way llama.cpp's perplexity tool measures it.

        The text's tokens are cut into windows of ``window`` tokens (BOS first); in each, the
        tokens of the second half are scored given every token before them in the window. A
        text shorter than one window is scored as one shorter window.
        """
        self._check_can_score("so it has no perplexity")
        if (
            isinstance(window, bool)
            or not isinstance(window, int)
            or not 16 <= window <= self.n_ctx
        ):
            raise InvalidParameterError(
                f"window must be an integer in [16, n_ctx={self.n_ctx}], got {window!r}"
            )
        active = self._adapter_set(adapters)
        ids = self.tokenize(text, add_bos=False)
        bos = [] if self.info.bos_id is None else [self.info.bos_id]
        bound = self._adapters.bind(active)
        try:
            return scoring.perplexity(self._scorer(bound), ids, bos, window, self.backend_name)
        finally:
            self._adapters.unbind(bound)

    def classify(
        self,
        prompt: str | Sequence[int],
        labels: Sequence[str],
        *,
        adapters: _Adapters = ENGINE_ADAPTERS,
        timeout: float | None = None,
    ) -> Classification:
        """Which of ``labels`` the model says follows ``prompt``, with a probability for each.

        The prompt is evaluated once; each label's tokens are scored after it (a label of
        several tokens branches from the prompt's KV cache), so a question with three labels
        costs one prefill and a few tokens, not a generation. Labels are the text as it would
        follow the prompt, leading space included (``[" normal", " warning"]``). The
        probabilities are the labels' likelihoods normalised over the labels. With
        ``timeout`` (seconds, from this call) the labels are scored a few dozen at a time and
        a call past it raises :class:`~edgegemma.errors.TimedOutError` (scores over part of
        the labels would be a wrong answer, not a partial one).
        """
        self._check_can_score("labels")
        check_timeout(timeout)
        label_ids = self._label_ids(labels)
        active = self._adapter_set(adapters)
        prompt_ids = self._classify_prompt_ids(prompt, label_ids)
        started = time.perf_counter()
        bound = self._adapters.bind(active)
        try:
            totals = scoring.label_totals(self._scorer(bound), prompt_ids, label_ids, timeout)
        finally:
            self._adapters.unbind(bound)
        seconds = time.perf_counter() - started
        return scoring.classification(
            labels, totals, len(prompt_ids), seconds, active, self.backend_name
        )

    def classify_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        labels: Sequence[str],
        *,
        adapters: _Adapters = ENGINE_ADAPTERS,
    ) -> list[Classification]:
        """:meth:`classify` for each prompt, under one adapter set.

        Where the backend evaluates several sequences together, the prompts run in batches:
        on llama.cpp their common prefix once, each prompt as its own sequence of one shared
        KV cache; on ONNX Runtime GenAI prompts of the same length together. LiteRT-LM runs
        them one after another. Each result's ``seconds`` is its share of the whole call.
        """
        batch = check_batch(prompts)
        self._check_can_score("labels")
        label_ids = self._label_ids(labels)  # bad labels fail before any prompt runs
        active = self._adapter_set(adapters)
        if not self.features.batch:
            return [self.classify(prompt, labels, adapters=active) for prompt in batch]
        prompt_ids = [self._classify_prompt_ids(prompt, label_ids) for prompt in batch]
        if not prompt_ids:
            return []
        started = time.perf_counter()
        bound = self._adapters.bind(active)
        try:
            with self._exclusive():
                self._forget_cache()  # the batch leaves no sequence in the backend

                def score_many(
                    prompts: list[list[int]], labels: list[list[int]]
                ) -> list[list[float]]:
                    return self._scoring(
                        lambda: self._backend.score_many(prompts, labels, adapters=handles(bound))
                    )

                totals = scoring.label_totals_many(
                    score_many, prompt_ids, label_ids, self.features, self.n_ctx
                )
        finally:
            self._adapters.unbind(bound)
        share = (time.perf_counter() - started) / len(prompt_ids)
        return [
            scoring.classification(labels, values, len(ids), share, active, self.backend_name)
            for ids, values in zip(prompt_ids, totals)
        ]

    def decide(
        self, text: str, questions: Questions, *, adapters: _Adapters = ENGINE_ADAPTERS
    ) -> Decisions:
        """Answer typed questions about ``text`` (a :class:`~.decisions.Schema`, or questions
        put in the prompt after it) from one evaluation of it, each question a branch scored
        like :meth:`classify`'s labels, its probabilities calibrated (:mod:`.decisions`)."""
        return decisions.decide_many(self, [text], questions, adapters)[0]

    def decide_many(
        self, texts: Sequence[str], questions: Questions, *, adapters: _Adapters = ENGINE_ADAPTERS
    ) -> list[Decisions]:
        """:meth:`decide` for each text, batched as :meth:`classify_many` batches prompts."""
        return decisions.decide_many(self, texts, questions, adapters)

    def prewarm(self, questions: Questions, *, adapters: _Adapters = ENGINE_ADAPTERS) -> None:
        """Measure the questions' priors and evaluate the schema's static prefix now, so that
        the next :meth:`decide` does neither (the prefix through the prefix cache)."""
        decisions.prewarm(self, questions, adapters)

    def _check_can_score(self, what: str) -> None:
        self._check_open()
        if not self.features.score:
            raise BackendUnavailableError(f"the {self.backend_name} backend cannot score {what}")

    def _classify_prompt_ids(self, prompt: object, label_ids: list[list[int]]) -> list[int]:
        prompt_ids = check_prompt(prompt, self.tokenize, self.info.vocab_size)
        longest = max(len(ids) for ids in label_ids)
        if len(prompt_ids) + longest > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt ({len(prompt_ids)} tokens) and the longest label ({longest}) exceed "
                f"the context window (n_ctx={self.n_ctx})",
                prompt_tokens=len(prompt_ids),
                max_tokens=longest,
                n_ctx=self.n_ctx,
            )
        return prompt_ids

    def _label_ids(self, labels: object) -> list[list[int]]:
        return scoring.label_ids(labels, lambda label: self.tokenize(label, add_bos=False))

    def _scorer(self, bound: Bound) -> scoring.Score:
        """The log-probability of each continuation after a prompt (see Backend.score), under
        ``bound``; a call holds the engine and leaves the prompt in the prefix cache."""

        def score(prompt: list[int], continuations: list[list[int]]) -> list[float]:
            with self._exclusive():
                key = adapter_key(bound)
                reuse = self._cache.reusable(prompt, key)
                self._forget_cache()
                found = self._scoring(
                    lambda: self._backend.score(
                        prompt, continuations, reuse=reuse, adapters=handles(bound)
                    )
                )
                self._cache.record(list(prompt), key)
                return found

        return score

    def _scoring(self, call: Callable[[], _T]) -> _T:
        """``call()``, with a runtime's own exceptions reported as edgegemma errors."""
        try:
            return call()
        except EdgeGemmaError:
            raise
        except Exception as exc:
            raise EdgeGemmaError(
                f"{self.backend_name} backend failed while scoring: {exc}"
            ) from exc

    # -- chat ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> ChatTemplate:
        """The chat template :meth:`chat` renders messages with: the model file's own, else
        Gemma 3's where the model's family chats in Gemma 3's turns (:mod:`.families`)."""
        if self._chat_template is None:
            own = self.info.chat_template
            if own is None and self.info.architecture in FAMILIES:
                require(self.info.architecture, "chat-template")
            self._chat_template = ChatTemplate(
                own if own is not None else gemma_template(),
                bos_token=GEMMA_BOS,
                eos_token=GEMMA_EOS,
                builtin=own is None,
            )
        return self._chat_template

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        """The prompt text :meth:`chat` gives the model for ``messages`` (the model's turn
        opened, ready for its answer)."""
        return self.chat_template.render(check_messages(messages))

    def chat(self, messages: Sequence[Message], **options: Unpack[ChatOptions]) -> Result:
        """The model's answer to a conversation: ``[{"role": "system" | "user" |
        "assistant", "content": ...}, ...]``, ending with the user's message.

        The messages are rendered with :attr:`chat_template`; generation stops at the end of
        the model's turn. Options are those of :meth:`generate`. When the conversation does not
        fit the context, ``on_overflow="truncate_left"`` drops whole turns, oldest first, and
        keeps the system message; ``"shift"`` never discards the system message either.
        """
        stream = self.stream_chat(messages, **options)
        with stream:
            for _ in stream:
                pass
        return stream.result

    def stream_chat(self, messages: Sequence[Message], **options: Unpack[ChatOptions]) -> Stream:
        """Like :meth:`chat`, but yields text pieces as they are produced."""
        check_option_names(options, "stream_chat")
        self._check_open()
        if "keep" in options:
            raise InvalidParameterError(
                "chat takes no keep=: the system message is what the context policy protects"
            )
        conversation = check_messages(messages)
        policy = options.get("on_overflow") or self.on_overflow
        check_policy(policy)
        max_tokens = options.get("max_tokens", DEFAULT_MAX_TOKENS)
        if policy == "truncate_left" and isinstance(max_tokens, (int, type(None))):
            ids, dropped = fit_conversation(conversation, max_tokens, self.n_ctx, self._chat_ids)
            policy = "error"  # whole turns are dropped, never a part of one
        else:
            ids, dropped = self._chat_ids(conversation), 0
        options["on_overflow"] = policy  # type: ignore[typeddict-item]  # checked above
        stream = self.stream(ids, **options, keep=self._system_prefix(conversation))
        stream._request.dropped = dropped
        return stream

    def _chat_ids(self, conversation: list[Message]) -> list[int]:
        ids = self.tokenize(self.chat_template.render(conversation), add_bos=False)
        bos = self.info.bos_id
        if bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)  # a template that leaves BOS to the tokenizer
        return ids

    def _system_prefix(self, conversation: list[Message]) -> int:
        """Tokens of the rendered prompt up to the end of the system message (else BOS)."""
        if conversation[0]["role"] != "system":
            return 0
        # The prompts of two different first questions agree up to where the question starts.
        system = conversation[0]
        one = self._chat_ids([system, {"role": "user", "content": "1"}])
        two = self._chat_ids([system, {"role": "user", "content": "2"}])
        return common_prefix(one, two)

    def reset(self) -> None:
        """Forget the KV cache; the next call evaluates its whole prompt."""
        with self._exclusive():
            self._forget_cache()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model and adapters. A generation running in another thread ends first.

        A stream paused between two pieces (its loop body running, or left unfinished) does
        not keep ``close`` waiting: the engine is freed when that stream ends or is closed,
        and iterating it again ends it with finish_reason ``"cancelled"``.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
        holder = self._holder() if self._holder is not None else None
        if holder is not None and holder.thread == threading.get_ident():
            holder.close()
        while not self._lock.acquire(timeout=0.05):
            with self._state:
                holder = self._holder() if self._holder is not None else None
                if holder is not None and not holder.running:
                    self._close_pending = True  # the holder's release closes the backend
                    return
        try:
            self._close_backend()
        finally:
            self._lock.release()

    def _close_backend(self) -> None:
        try:
            self._backend.close()
        finally:
            self._adapters.clear()
            self._forget_cache()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"n_ctx={self.n_ctx}"
        return f"<Engine {self.backend_name} {self.model_path.name} {state}>"

    # -- internals -----------------------------------------------------------------------

    def _generate(
        self,
        request: Request,
        outcome: list[Result],
        sequence: BatchedSequence | None = None,
        batch_size: int = 1,
    ) -> Generator[str, None, None]:
        """Run ``request``, yielding once per generated token (its text, possibly empty), on
        the backend's own sequence or on one ``sequence`` of a batch of ``batch_size``; its
        Result goes to ``outcome``."""
        driver: Backend | BatchedSequence = sequence if sequence is not None else self._backend
        fitted = self._fit_context(request, self.n_ctx)
        tokens = fitted.tokens
        progress = Progress(
            TextAssembler(request.stop), len(tokens), fitted.truncated, fitted.limit_detail
        )
        self._free_doomed()
        key = adapter_key(request.bound)
        reuse = self._cache.reusable(tokens, key)
        self._forget_cache()  # until start() returns, the backend's cache is in an unknown state
        try:
            started = time.perf_counter()
            self._follow_free_cores()
            progress.reused = driver.start(
                tokens, reuse=reuse, adapters=request.handles, sampling=request.sampling
            )
            progress.prefill_s = time.perf_counter() - started
            self._cache.record(tokens, key)  # the same list: it grows with the generated tokens
            matcher = (
                Matcher(request.constraint, self._vocabulary())
                if request.constraint is not None
                else None
            )
            while len(progress.generated) < fitted.limit and not self._ends_before(
                progress, request, matcher
            ):
                if len(tokens) > self.n_ctx:  # the pending token would not fit: make room
                    progress.truncated += self._shift(tokens, request.protected)
                if self._threads is not None:
                    self._follow_free_cores()
                token = driver.next_token(matcher.mask() if matcher is not None else None)
                progress.arrived(time.perf_counter())
                if token in self.info.eog_ids:
                    progress.end("stop", "end of generation token")
                    break
                progress.add(token, self._token_logprob(driver, token, request.logprobs))
                if matcher is not None:
                    matcher.consume(token)
                tokens.append(token)
                piece, hit = progress.text.feed(self._backend.token_bytes(token))
                # One yield per token, text or not: generate_many drives sequences in lockstep.
                yield piece
                if hit is not None:
                    progress.end("stop", f"stop string {hit!r}")
                    break
            if matcher is not None and progress.finish == "length" and not matcher.satisfied:
                progress.detail += f" before the output satisfied the {matcher.kind} constraint"
            if sequence is not None:
                # Leave the batch before the held-back text goes out: that yield takes no
                # token, and a row still waiting in the lockstep would stall the next pass.
                sequence.finish()
            tail = progress.text.finish(stopped=progress.detail.startswith("stop string"))
            if tail:
                yield tail
        except GeneratorExit:
            progress.end("cancelled", "the stream was closed")
        except EdgeGemmaError:
            self._forget_cache()
            raise
        except Exception as exc:
            self._forget_cache()
            raise EdgeGemmaError(
                f"{self.backend_name} backend failed during generation: {exc}"
            ) from exc
        finally:
            self._unbind(request)
            self._free_doomed()
        outcome.append(progress.result(request, batch_size, self._backend.runtime_stats()))

    def _ends_before(self, progress: Progress, request: Request, matcher: Matcher | None) -> bool:
        """Whether generation ends before the next token (and why, in ``progress``)."""
        if self._closed:
            progress.end("cancelled", "the engine was closed")
        elif time.perf_counter() > request.deadline:
            progress.end("timeout", f"timeout ({request.timeout} s) reached")
        elif matcher is not None and matcher.done:
            progress.end("stop", f"the output satisfies the {matcher.kind} constraint")
        else:
            return False
        return True

    def _token_logprob(
        self, driver: Backend | BatchedSequence, token: int, top: int | None
    ) -> TokenLogprob | None:
        if top is None:
            return None
        return token_logprob(driver.logits(), token, top, self._backend.token_bytes)

    def _fit_context(self, request: Request, n_ctx: int) -> Fitted:
        """Apply the overflow policy: (tokens to evaluate, tokens dropped, limit, limit reason)."""
        tokens = list(request.prompt_ids)
        wanted = request.max_tokens
        needed = len(tokens) + (wanted if wanted is not None else 1)
        policy = request.on_overflow

        def overflow(why: str) -> ContextOverflowError:
            advice = {
                "error": 'or pass on_overflow="truncate_left"',
                "truncate_left": "or protect less of the prompt with keep=",
                "shift": 'or pass on_overflow="truncate_left"',
            }[policy]
            return ContextOverflowError(
                f"{why}: the prompt has {len(request.prompt_ids)} tokens, max_tokens is "
                f"{wanted}, the context window holds n_ctx={n_ctx} tokens "
                f'(on_overflow="{policy}"). Shorten the prompt, lower max_tokens, load with a '
                f"larger n_ctx, {advice}.",
                prompt_tokens=len(request.prompt_ids),
                max_tokens=wanted,
                n_ctx=n_ctx,
            )

        truncated = request.dropped
        if policy == "shift":
            if len(tokens) >= n_ctx:
                raise overflow("the prompt alone fills the context window")
        elif needed > n_ctx:
            if policy == "error":
                raise overflow("prompt plus max_tokens exceed the context window")
            truncated = needed - n_ctx
            droppable = len(tokens) - request.protected - 1
            if truncated > droppable:
                raise overflow(
                    f"dropping old prompt tokens cannot make room: {request.protected} are "
                    "protected by keep="
                )
            del tokens[request.protected : request.protected + truncated]
        if wanted is None:
            return Fitted(
                tokens, truncated, n_ctx - len(tokens), f"context window full (n_ctx={n_ctx})"
            )
        return Fitted(tokens, truncated, wanted, f"max_tokens ({wanted}) reached")

    def _shift(self, tokens: list[int], protected: int) -> int:
        """Discard half of the unprotected cached tokens (llama.cpp's context shift)."""
        keep = max(protected, 1)
        discard = (len(tokens) - 1 - keep) // 2
        if discard <= 0:
            raise ContextOverflowError(
                f"cannot shift the context: {keep} of {self.n_ctx} tokens are protected",
                prompt_tokens=len(tokens),
                max_tokens=None,
                n_ctx=self.n_ctx,
            )
        # Shifted keys are re-rotated, not recomputed: close to, but not bit-identical with, a
        # fresh evaluation. Forgetting them keeps "a reused prefix equals fresh computation".
        self._forget_cache()
        self._backend.shift(keep, discard)
        del tokens[keep : keep + discard]
        log.debug("shifted context: kept %d, discarded %d", keep, discard)
        return discard

    def _follow_free_cores(self) -> None:
        """Give the backend as many threads as there are free cores (see :mod:`.threads`)."""
        if self._threads is None:
            return
        wanted = self._threads.threads()
        if wanted != self._n_threads:
            self._backend.set_threads(wanted)
            self._n_threads = wanted

    def _forget_cache(self) -> None:
        self._cache.forget()

    def _unbind(self, request: Request) -> None:
        with self._state:
            if request.released:
                return
            request.released = True
        self._adapters.unbind(request.bound)

    def _free_doomed_if_idle(self) -> None:
        """Free unloaded adapters now if nobody holds the engine (else its holder will)."""
        if self._adapters.any_doomed and not self._closed and self._lock.acquire(blocking=False):
            try:
                self._free_doomed()
            finally:
                self._lock.release()

    def _free_doomed(self) -> None:
        """Free unloaded adapters no call uses any more. Only under the engine lock."""
        for loaded in self._adapters.take_doomed():
            if self._cache.computed_with(loaded.uid):
                self._forget_cache()
            self._backend.free_adapter(loaded.handle)

    def _adapter_set(self, adapters: object) -> dict[str, float]:
        """The adapter set a call runs with: the engine's, or the one it passed, checked."""
        return self._active if adapters is ENGINE_ADAPTERS else self._adapters.checked(adapters)

    def _vocabulary(self) -> Vocabulary:
        """The backend's vocabulary for constraints, built on first use (the lock is held)."""
        if self._vocab is None:
            info = self._backend.info
            self._vocab = Vocabulary(
                self._backend.token_bytes,
                self._backend.tokenize,
                vocab_size=info.vocab_size,
                bos_id=info.bos_id,
                eog_ids=info.eog_ids,
            )
        return self._vocab

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed")

    def _acquire(self, holder: Holder) -> None:
        if self._holder_thread() == threading.get_ident():
            raise EngineBusyError(
                "another stream of this engine is open and this thread is iterating it; "
                "exhaust or close() it before starting a new call"
            )
        self._lock.acquire()
        if self._closed:
            self._lock.release()
            raise EngineClosedError("the engine is closed")
        with self._state:
            self._holder = weakref.ref(holder)

    def _release(self) -> None:
        with self._state:
            self._holder = None
            close_now, self._close_pending = self._close_pending, False
        try:
            if close_now:
                self._close_backend()
        finally:
            self._lock.release()

    def _holder_thread(self) -> int | None:
        """The thread iterating the stream that holds the engine, if a stream holds it."""
        holder = self._holder() if self._holder is not None else None
        return holder.thread if holder is not None else None

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        """The lock for a read of the model, unless this thread's open stream holds it already
        (the backend is then paused between two tokens)."""
        self._check_open()
        if self._holder_thread() == threading.get_ident():
            return contextlib.nullcontext()
        return self._locked()

    def _exclusive(self) -> contextlib.AbstractContextManager[None]:
        self._check_open()
        if self._holder_thread() == threading.get_ident():
            raise EngineBusyError("a stream of this engine is open in this thread; close it first")
        return self._locked()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self._check_open()  # it may have closed while this thread waited
            yield


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    backend: str | None = None,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    on_overflow: OverflowPolicy = "error",
    prefix_cache: PrefixCachePolicy = "exact",
    **options: object,
) -> Engine:
    """Load a base model: a name from models.lock (fetched on first use) or a file path.

    Without ``model``: Gemma 3 270M, the fast variant on llama.cpp
    (:data:`edgegemma.models.DEFAULT_MODEL`), the pinned file on the other backends, whose
    builds are made from it (:func:`edgegemma.models.default_model`).

    ``prefix_cache="exact"`` reuses a cached prompt prefix only where that gives exactly the
    fresh answer (llama.cpp without adapters); ``"always"`` reuses it whenever the adapter set
    matches, for speed with long shared prefixes, at the price of answers that can differ
    slightly with what was cached before.
    """
    from . import models

    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 16 <= n_ctx <= 2**20:
        raise InvalidParameterError(f"n_ctx must be an integer in [16, 1048576], got {n_ctx!r}")
    n_ctx = round_n_ctx(n_ctx)  # every backend gets the window llama.cpp would pad to
    cores = len(usable_cores())
    policy = ThreadPolicy(default_threads(), fixed=False) if n_threads is None else None
    if n_threads is None:
        n_threads = default_threads()
    elif (
        isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= cores
    ):
        raise InvalidParameterError(
            f"n_threads must be an integer from 1 to the {cores} cores this process may use, "
            f"got {n_threads!r}"
        )
    check_policy(on_overflow)
    check_prefix_cache(prefix_cache)
    path = models.resolve(models.default_model(backend) if model is None else model)
    name = backend or backend_for_path(path)
    backend_class = get_backend(name)
    unknown = set(options) - backend_class.features.options
    if unknown:
        known = ", ".join(sorted(backend_class.features.options)) or "none"
        raise InvalidParameterError(
            f"unknown {name} options: {', '.join(sorted(unknown))} (it takes: {known})"
        )
    opened = backend_class.open(
        path, BackendOptions(n_ctx=n_ctx, n_threads=n_threads, extra=dict(options))
    )
    return Engine(
        opened, model_path=path, on_overflow=on_overflow, prefix_cache=prefix_cache, threads=policy
    )
