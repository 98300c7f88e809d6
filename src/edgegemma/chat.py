"""Chat messages rendered into a prompt by the model's chat template.

A template is Jinja, as Hugging Face tokenizers and GGUF files (``tokenizer.chat_template``)
carry it, and runs in Jinja's immutable sandbox with the names Hugging Face gives templates
(``bos_token``, ``eos_token``, ``add_generation_prompt``, ``raise_exception``,
``strftime_now``), so a model's own template renders here as it does in ``transformers``.
A model file without one gets Gemma 3's (:data:`GEMMA_TEMPLATE`).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypedDict

from .errors import ContextOverflowError, InvalidParameterError, ModelError

if TYPE_CHECKING:
    import jinja2

ROLES: tuple[str, ...] = ("system", "user", "assistant")
Role = Literal["system", "user", "assistant"]
GEMMA_TEMPLATE_FILE = Path(__file__).with_name("data") / "gemma3-chat-template.jinja"
"""Gemma 3's chat template, as Google publishes it in the instruction-tuned models'
``tokenizer_config.json``: used for a model file that carries no template of its own."""


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class Message(TypedDict):
    """One turn of a conversation, as the OpenAI API and ``transformers`` spell it."""

    role: Role
    content: str | list[TextPart]


@cache
def gemma_template() -> str:
    return GEMMA_TEMPLATE_FILE.read_text(encoding="utf-8")


def _raise(message: str) -> NoReturn:
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value: object, indent: int | None = None) -> str:
    # Hugging Face's tojson keeps non-ASCII text as it is; Jinja's own escapes it for HTML.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


TEMPLATE_TIME_LIMIT_S = 5.0
"""Seconds a chat template may take to render one conversation."""
TEMPLATE_MAX_CHARS = 2_000_000
"""Characters a rendered prompt, or any string a template builds, may have (far past any
context window: 128k tokens are about 0.5 M characters)."""
_TEMPLATE_MAX_NUMBER = 1_000_000
"""The largest number a template may hand to a call (a width, a count, a repeat)."""


class TemplateLimitError(Exception):
    """A template went past one of the limits above."""


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special-token texts it is rendered with.

    A template is the model file's code: it runs sandboxed, and within bounds of time
    (``time_limit_s``) and size (``max_chars``), so that no template, however written, can
    hang or exhaust the process rendering it."""

    source: str
    bos_token: str
    eos_token: str
    builtin: bool
    """Whether this is Gemma 3's template, used because the model file has none."""
    time_limit_s: float = TEMPLATE_TIME_LIMIT_S
    max_chars: int = TEMPLATE_MAX_CHARS

    def __post_init__(self) -> None:
        _compile(self.source)  # a broken template fails here, not at the first chat

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``; a template's own refusal is an InvalidParameterError."""
        import jinja2

        template = _compile(self.source)
        context = {
            "messages": [dict(m) for m in messages],
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            with _time_limit(self.time_limit_s):
                pieces, size = [], 0
                for piece in template.generate(context):
                    size += len(piece)
                    if size > self.max_chars:
                        raise TemplateLimitError(f"its output passed {self.max_chars} characters")
                    pieces.append(piece)
                return "".join(pieces)
        except TemplateLimitError as exc:
            raise InvalidParameterError(f"the chat template was stopped: {exc}") from None
        except jinja2.TemplateError as exc:
            raise InvalidParameterError(f"the chat template refused the messages: {exc}") from None
        except (Exception, RecursionError, MemoryError) as exc:  # noqa: BLE001 -- the template's own failure
            raise InvalidParameterError(
                f"the chat template failed on the messages ({type(exc).__name__}: {exc})"
            ) from None


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TemplateLimitError in this thread's Python code once ``seconds`` have passed.

    Rendering runs the template's compiled Python; a trace function looks at the clock
    every few hundred lines of it (the sandbox bounds each single operation's size)."""
    deadline = time.monotonic() + seconds
    previous = sys.gettrace()
    events = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal events
        events += 1
        if events % 256 == 0 and time.monotonic() > deadline:
            raise TemplateLimitError(f"it took longer than {seconds:g} s")
        return tracer

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def _check_call(obj: Any, args: Sequence[Any]) -> None:
    """Refuse a call from a template whose arguments could build something huge."""
    for value in args:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if abs(value) > _TEMPLATE_MAX_NUMBER:
                raise TemplateLimitError(
                    f"it passed {value!r} to {getattr(obj, '__name__', obj)!r}"
                )
        elif isinstance(value, str) and _WIDE_FORMAT.search(value):
            raise TemplateLimitError("it formats a field wider than the limit")
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, str) and _WIDE_FORMAT.search(owner):  # "{:>9999999}".format(...)
        raise TemplateLimitError("it formats a field wider than the limit")


@cache
def _compile(source: str) -> jinja2.Template:
    # Jinja is imported on the first chat, not with edgegemma: memory a process that only
    # generates does without (docs/models.md, "Memory").
    import jinja2.ext
    import jinja2.sandbox

    class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        """The sandbox, with each operation that could build something huge checked first."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj: Any, attribute: str) -> Any:
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                _check_call(obj, [obj])  # the sandbox wraps str.format: check its text here
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            if isinstance(obj, str) and argument in ("format", "format_map"):
                _check_call(obj, [obj])
            return super().getitem(obj, argument)

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            _check_call(obj, [*args, *kwargs.values()])
            return super().call(context, obj, *args, **kwargs)

    environment = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.globals.pop("lipsum", None)  # text generation for demos: lipsum(1e8) hangs
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = _now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidParameterError(
            f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message})"
        ) from None


_WIDE_FORMAT = re.compile(r"%[-+ #0]*\d{7,}|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")
"""A printf or str.format field a million characters wide or more."""


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a template operation whose result would pass the limits, before it runs."""
    sized = (str, list, tuple)
    numbers = (int, float)
    if operator == "*":
        for sequence, count in ((left, right), (right, left)):
            if (
                isinstance(sequence, sized)
                and isinstance(count, int)
                and len(sequence) * count > TEMPLATE_MAX_CHARS
            ):
                raise TemplateLimitError(f"it repeats {len(sequence)} items {count} times")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        if len(left) + len(right) > TEMPLATE_MAX_CHARS:
            raise TemplateLimitError("it joins sequences past the limit")
    elif operator == "**" and isinstance(left, numbers) and isinstance(right, numbers):
        if abs(right) > 1024 or (abs(left) > 2 and abs(right) * math.log2(abs(left)) > 4096):
            raise TemplateLimitError(f"it raises {left!r} to {right!r}")
    elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
        raise TemplateLimitError("it formats a field wider than the limit")


def check_messages(messages: object) -> list[Message]:
    """``messages`` as a list of well-formed messages, or an InvalidParameterError saying why."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidParameterError(
            'messages must be a list of {"role": ..., "content": ...} dicts, '
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidParameterError("messages must hold at least one message")
    checked: list[Message] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise InvalidParameterError(f"{where} must be a dict, got {type(message).__name__}")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise InvalidParameterError(f"{where} has unknown keys {sorted(unknown)}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidParameterError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
        checked.append({"role": role, "content": _check_content(message.get("content"), where)})
    if checked[-1]["role"] != "user":
        raise InvalidParameterError(
            f"the last message must be the user's (the model answers it), not the {checked[-1]['role']}'s"
        )
    return checked


def _check_content(content: object, where: str) -> str | list[TextPart]:
    if isinstance(content, str):
        _check_text(content, where)
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)) and content:
        parts: list[TextPart] = []
        for i, part in enumerate(content):
            if not (
                isinstance(part, Mapping)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
                and set(part) == {"type", "text"}
            ):
                raise InvalidParameterError(
                    f'{where}.content[{i}] must be {{"type": "text", "text": ...}}: '
                    "only text content is supported"
                )
            _check_text(part["text"], f"{where}.content[{i}]")
            parts.append({"type": "text", "text": part["text"]})
        return parts
    raise InvalidParameterError(
        f"{where}.content must be a string or a non-empty list of text parts, got {content!r:.80}"
    )


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParameterError(f"{where} is not valid Unicode (lone surrogates)") from None


def droppable_turns(messages: Sequence[Message]) -> list[int]:
    """How many leading messages may be dropped, oldest first, each leaving a conversation
    that still starts with the system message (if any) and then a user turn.

    The counts exclude the system message, which is never dropped, and never take the last
    message: a truncated conversation still asks the same question.
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    rest = messages[start:]
    return [n for n in range(1, len(rest)) if rest[n]["role"] == "user"]


def without_turns(messages: Sequence[Message], count: int) -> list[Message]:
    start = 1 if messages and messages[0]["role"] == "system" else 0
    return [*messages[:start], *messages[start + count :]]


def folder_template(folder: Path) -> str | None:
    """The chat template of a Hugging Face style model folder: ``chat_template.jinja`` (what
    transformers writes since v4.50), else ``chat_template`` in ``tokenizer_config.json``
    (a string, or a list of named templates of which "default" is the one for chat)."""
    jinja = folder / "chat_template.jinja"
    config = folder / "tokenizer_config.json"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8") or None
        if not config.is_file():
            return None
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"cannot read the chat template in {folder}: {exc}") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def fit_conversation(
    conversation: list[Message],
    max_tokens: int | None,
    n_ctx: int,
    ids_of: Callable[[list[Message]], list[int]],
) -> tuple[list[int], int]:
    """The prompt (``ids_of`` a conversation) of ``conversation`` with the fewest old turns
    dropped that leaves room for ``max_tokens`` in ``n_ctx``, and the tokens dropped: chat's
    ``truncate_left``, which drops whole turns and keeps the system message."""
    ids = ids_of(conversation)
    budget = n_ctx - (max_tokens if max_tokens is not None else 1)
    if len(ids) <= budget:
        return ids, 0
    full = len(ids)
    ids = fewest_dropped(conversation, budget, ids_of) or ids
    if len(ids) > budget:
        system = " and the system message" if conversation[0]["role"] == "system" else ""
        raise ContextOverflowError(
            f"the conversation does not fit the context window even with its old turns "
            f"dropped: its last turn{system} take {len(ids)} tokens, max_tokens is "
            f"{max_tokens}, n_ctx={n_ctx}. Shorten the last message, lower max_tokens or load "
            "with a larger n_ctx.",
            prompt_tokens=len(ids),
            max_tokens=max_tokens,
            n_ctx=n_ctx,
        )
    return ids, full - len(ids)


def fewest_dropped(
    conversation: list[Message], budget: int, ids_of: Callable[[list[Message]], list[int]]
) -> list[int] | None:
    """The prompt (``ids_of`` a conversation) of ``conversation`` with the fewest old turns
    dropped that fits ``budget`` tokens, else with all droppable turns dropped (None if none
    can be).

    Dropping more turns never lengthens the prompt, so the count is found by bisection: a few
    renders of the template, not one per turn (which takes seconds for a long conversation)."""
    counts = droppable_turns(conversation)
    if not counts:
        return None
    low, high = 0, len(counts) - 1
    best = ids_of(without_turns(conversation, counts[high]))
    if len(best) > budget:
        return best
    while low < high:
        middle = (low + high) // 2
        ids = ids_of(without_turns(conversation, counts[middle]))
        if len(ids) <= budget:
            best, high = ids, middle
        else:
            low = middle + 1
    return best
