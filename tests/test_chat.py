"""Chat: templates rendered token for token as their reference implementations render them,
the model's own template found in every format, and the chat policy (whole turns dropped,
the system message kept) on the real model and, exhaustively, on the scripted backend."""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backend_kits import BACKENDS, backend_model
from conftest import PROMPT
from hypothesis import given, settings
from hypothesis import strategies as st

import edgegemma
from edgegemma import ContextOverflowError, Engine, InvalidParameterError, skills
from edgegemma.backends.scripted import ScriptedBackend
from edgegemma.chat import ChatTemplate, folder_template, gemma_template
from edgegemma.tflitefile import bundle_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Name a colour.  "},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "How are you? 😀 über"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}],
        },
        {"role": "assistant", "content": "ok\n\n"},
        {"role": "user", "content": "line one\nline two"},
    ],
]
CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[MODEL] {% endif %}"
)


@pytest.fixture
def opened(engines, backend):
    return engines(backend)


# -- rendering, against the references ---------------------------------------------------


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_the_builtin_template_renders_as_transformers_does(conversation):
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ChatTemplate(gemma_template(), bos_token="<bos>", eos_token="<eos>", builtin=True)
    [reference], _ = render_jinja_template(
        conversations=[conversation],
        chat_template=gemma_template(),
        add_generation_prompt=True,
        bos_token="<bos>",
        eos_token="<eos>",
    )
    assert template.render(conversation) == reference


@pytest.mark.parametrize(
    "conversation", [c for c in CONVERSATIONS if all(isinstance(m["content"], str) for m in c)]
)
def test_llamacpp_tokens_equal_llama_cpps_own_gemma_template(engine, conversation):
    """llama.cpp's C++ Gemma formatter (llama_chat_apply_template) is an independent
    implementation; the tokens it gives must be the ones chat() feeds the model."""
    import llama_cpp as ll

    messages = (ll.llama_chat_message * len(conversation))()
    texts = [(m["role"].encode(), m["content"].encode()) for m in conversation]  # kept alive
    for slot, (role, content) in zip(messages, texts):
        slot.role, slot.content = role, content
    buf = ctypes.create_string_buffer(1 << 16)
    n = ll.llama_chat_apply_template(b"gemma", messages, len(texts), True, buf, len(buf))
    reference = buf.raw[:n].decode()
    ours = engine._chat_ids(list(conversation))
    assert ours == engine.tokenize(reference, add_bos=True)
    assert engine.apply_chat_template(conversation) == "<bos>" + reference


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_onnx_tokens_equal_onnx_runtime_genais_template_engine(engines, conversation):
    """ONNX Runtime GenAI renders templates with its own engine (minja, C++)."""
    engine, _ = engines("onnx")
    tokenizer = engine._backend._tokenizer
    reference = tokenizer.apply_chat_template(
        json.dumps(conversation), template_str=gemma_template(), add_generation_prompt=True
    )
    assert engine.apply_chat_template(conversation) == reference
    assert engine._chat_ids(list(conversation)) == list(tokenizer.encode(reference))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_tokenizes_the_prompt_alike_and_ends_the_turn(opened, backend, engine):
    chat_engine, _ = opened
    for conversation in CONVERSATIONS:
        assert chat_engine._chat_ids(conversation) == engine._chat_ids(conversation), backend
    end_of_turn = chat_engine.tokenize("<end_of_turn>", add_bos=False)
    assert len(end_of_turn) == 1 and end_of_turn[0] in chat_engine.info.eog_ids
    assert chat_engine.chat_template.builtin


# -- the model's own template -------------------------------------------------------------


@pytest.fixture(scope="module")
def templated_gguf(tmp_path_factory, gguf_path) -> Path:
    folder = tmp_path_factory.mktemp("templated")
    template_file = folder / "template.jinja"
    template_file.write_text(CUSTOM_TEMPLATE)
    out = folder / "templated.gguf"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gguf.scripts.gguf_new_metadata",
            str(gguf_path),
            str(out),
            "--chat-template-file",
            str(template_file),
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_a_gguf_template_is_used_by_chat(templated_gguf):
    with edgegemma.load(templated_gguf, n_ctx=256) as engine:
        assert not engine.chat_template.builtin
        assert engine.chat_template.source == CUSTOM_TEMPLATE
        messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
        assert engine.apply_chat_template(messages) == "<bos>[SYSTEM] S\n[USER] U\n[MODEL] "
        result = engine.chat(messages, max_tokens=4)
        assert result.stats.prompt_tokens == len(engine.tokenize("[SYSTEM] S\n[USER] U\n[MODEL] "))


def test_a_model_folder_template_is_found(tmp_path):
    assert folder_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert folder_template(tmp_path) == "A"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "T"},
                    {"name": "default", "template": "D"},
                ]
            }
        )
    )
    assert folder_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert folder_template(tmp_path) == "J"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(edgegemma.ModelError):
        folder_template(tmp_path)


def test_the_onnx_backend_reads_its_folders_template(tmp_path, gguf_path):
    built = backend_model("onnx", gguf_path)
    for item in built.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "chat_template.jinja").write_text(CUSTOM_TEMPLATE)
    with edgegemma.load(tmp_path, backend="onnx", n_ctx=256) as engine:
        assert engine.info.chat_template == CUSTOM_TEMPLATE
        assert not engine.chat_template.builtin


def test_a_litertlm_bundle_carries_the_template_the_converter_gives_it(tmp_path):
    """The converter writes the GGUF's template into the bundle's LLM metadata, where
    LiteRT-LM's Conversation API reads it; the backend reads it back from there."""
    pytest.importorskip("litert_lm_builder")
    from edgegemma.convert.litert import _write_litertlm

    graph, spm = tmp_path / "model.tflite", tmp_path / "tokenizer.spm"
    graph.write_bytes(b"\x18\x00\x00\x00TFL3" + bytes(64))
    spm.write_bytes(b"\x00" * 16)
    for template in (CUSTOM_TEMPLATE, None):
        out = tmp_path / "model.litertlm"
        _write_litertlm(graph, spm, out, 512, template, tmp_path)
        assert bundle_chat_template(out) == template


# -- chat on the real model ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_is_generate_on_the_rendered_prompt(opened, backend):
    engine, reference = opened
    conversation = CONVERSATIONS[2]
    result = engine.chat(conversation, max_tokens=8)
    plain = engine.generate(engine._chat_ids(conversation), max_tokens=8)
    assert result.token_ids == plain.token_ids
    assert result.stats.prompt_tokens == plain.stats.prompt_tokens
    streamed = engine.stream_chat(conversation, max_tokens=8)
    assert "".join(streamed) == result.text
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_with_an_adapter_is_generate_with_it(opened, backend, gguf_path):
    engine, reference = opened
    engine.load_adapter("sensor", skills.adapter_path("sensor", backend, model=str(gguf_path)))
    try:
        conversation = [{"role": "user", "content": "temp=81C fan=0rpm; status?"}]
        ids = engine._chat_ids(conversation)
        with_adapter = engine.chat(conversation, max_tokens=6, adapters={"sensor": 1.0})
        assert with_adapter.adapters == {"sensor": 1.0}
        assert (
            with_adapter.token_ids
            == engine.generate(ids, max_tokens=6, adapters={"sensor": 1.0}).token_ids
        )
    finally:
        engine.unload_adapter("sensor")
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


def test_chat_takes_constraints(engine):
    answer = engine.chat(
        [{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        choices=["yes", "no"],
        max_tokens=4,
    )
    assert answer.text in ("yes", "no") and answer.finish_reason == "stop"
    shaped = engine.chat(
        [{"role": "user", "content": "A city as JSON"}],
        json_schema={
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
        max_tokens=24,
    )
    assert set(json.loads(shaped.text)) == {"city"}


def test_truncate_left_drops_whole_turns_on_the_real_model(gguf_path):
    with edgegemma.load(gguf_path, n_ctx=256, on_overflow="truncate_left") as engine:
        conversation = [{"role": "system", "content": "Keep me."}]
        for i in range(12):
            conversation += [
                {"role": "user", "content": f"Question number {i}: " + "words " * 10},
                {"role": "assistant", "content": f"Answer number {i}."},
            ]
        conversation.append({"role": "user", "content": "Last question?"})
        result = engine.chat(conversation, max_tokens=16)
        kept = [m for m in conversation if m["role"] != "system"]
        fitting = next(
            n
            for n in range(len(kept))
            if kept[n]["role"] == "user"
            and len(engine._chat_ids([conversation[0], *kept[n:]])) + 16 <= 256
        )
        expected = engine._chat_ids([conversation[0], *kept[fitting:]])
        assert result.stats.prompt_tokens == len(expected)
        assert result.stats.truncated_tokens == len(engine._chat_ids(conversation)) - len(expected)
        assert fitting > 0
        with pytest.raises(ContextOverflowError):
            engine.chat(conversation, max_tokens=16, on_overflow="error")
        with pytest.raises(ContextOverflowError, match="last turn"):
            engine.chat([{"role": "user", "content": "word " * 400}], max_tokens=16)
        assert engine.chat(conversation[-1:], max_tokens=4).finish_reason == "length"


HOSTILE_MESSAGES = [
    ("a string", "hello"),
    ("no messages", []),
    ("not dicts", ["hello"]),
    ("an unknown role", [{"role": "tool", "content": "x"}]),
    ("no content", [{"role": "user"}]),
    ("content of the wrong type", [{"role": "user", "content": 3}]),
    ("an image part", [{"role": "user", "content": [{"type": "image", "url": "x"}]}]),
    ("an unknown key", [{"role": "user", "content": "x", "tool_calls": []}]),
    (
        "ending with the model",
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    ),
    ("roles not alternating", [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]),
    ("a lone surrogate", [{"role": "user", "content": "\udcff"}]),
]


@pytest.mark.parametrize(
    ("why", "messages"), HOSTILE_MESSAGES, ids=[h[0] for h in HOSTILE_MESSAGES]
)
def test_bad_messages_are_invalid_parameters(engine, why, messages):
    with pytest.raises(InvalidParameterError):
        engine.chat(messages, max_tokens=2)
    assert engine.generate(PROMPT, max_tokens=2).finish_reason == "length"


def test_chat_refuses_keep_and_a_broken_template(engine):
    with pytest.raises(InvalidParameterError, match="keep"):
        engine.chat([{"role": "user", "content": "x"}], keep=3)  # type: ignore[call-arg]
    with pytest.raises(InvalidParameterError, match="not valid Jinja"):
        ChatTemplate("{% for %}", bos_token="<bos>", eos_token="<eos>", builtin=False)
    with pytest.raises(InvalidParameterError):  # the sandbox refuses attribute tricks
        ChatTemplate(
            "{{ messages.__class__.__mro__ }}", bos_token="", eos_token="", builtin=False
        ).render([{"role": "user", "content": "x"}])


HOSTILE_TEMPLATES = [
    (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "longer than 0.5 s",
    ),
    ("{{ lipsum(100000000) }}", "passed 100000000"),
    ("{{ 'x' * 3000000000 }}", "repeats 1 items 3000000000 times"),
    ("{{ ('x' * 1000000 + 'y' * 1000000) + 'z' * 1000000 }}", "joins sequences past the limit"),
    ("{{ 10 ** (10 ** 10) }}", "raises 10 to"),
    ("{{ 'a'.center(3000000000) }}", "passed 3000000000"),
    ("{{ '%9999999999s' % 'a' }}", "wider than the limit"),
    ("{{ '{:>9999999999}'.format('a') }}", "wider than the limit"),
    ("{{ '{:>9999999999}'['format']('a') }}", "wider than the limit"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed 2000000 characters"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ 1e308 * 10 ** 300 }}", "Overflow|overflow|inf"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    ("{{ range(1, 10, 0) | list }}", "ValueError"),
]


@pytest.mark.parametrize(("source", "said"), HOSTILE_TEMPLATES)
def test_a_hostile_template_is_stopped_within_its_bounds(source, said):
    """A model file's template is code: whatever it does, rendering ends within the time
    limit with an InvalidParameterError, and the process keeps its memory."""
    template = ChatTemplate(
        source, bos_token="<bos>", eos_token="<eos>", builtin=False, time_limit_s=0.5
    )
    started = time.monotonic()
    try:
        rendered = template.render([{"role": "user", "content": "x"}])
    except InvalidParameterError as exc:
        assert re.search(said, str(exc)), str(exc)
    else:  # an overflow Jinja turns into inf is harmless text
        assert "inf" in rendered
    assert time.monotonic() - started < 5


def test_truncate_left_renders_the_template_a_few_times_not_once_per_turn():
    engine, _ = _scripted(4096, "truncate_left")
    renders = 0
    template = engine.chat_template
    original = type(template).render

    def counting(self, *args, **kwargs):
        nonlocal renders
        renders += 1
        return original(self, *args, **kwargs)

    conversation = []
    for i in range(1600):
        conversation += [
            {"role": "user", "content": f"q{i} " * 3},
            {"role": "assistant", "content": "a"},
        ]
    conversation.append({"role": "user", "content": "last"})
    type(template).render = counting  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        result = engine.chat(conversation, max_tokens=2)
    finally:
        type(template).render = original  # type: ignore[method-assign]
    assert result.stats.prompt_tokens <= 4096 and renders <= 16
    assert time.monotonic() - started < 30


# -- the chat policy, exhaustively ----------------------------------------------------------

TURN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<m>{% endif %}"
)
words = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=0, max_size=12)


@st.composite
def conversations(draw):
    system = draw(st.booleans())
    turns = draw(st.integers(0, 6))
    messages = [{"role": "system", "content": draw(words)}] if system else []
    for _ in range(turns):
        messages += [
            {"role": "user", "content": draw(words)},
            {"role": "assistant", "content": draw(words)},
        ]
    return [*messages, {"role": "user", "content": draw(words)}]


def _scripted(n_ctx: int, policy: str) -> tuple[Engine, ScriptedBackend]:
    backend = ScriptedBackend(
        lambda prompt, adapters: "ok", n_ctx=n_ctx, chat_template=TURN_TEMPLATE
    )
    return Engine(backend, model_path=Path("scripted"), on_overflow=policy), backend


@settings(max_examples=300, deadline=None)
@given(conversation=conversations(), n_ctx=st.integers(8, 120), max_tokens=st.integers(1, 12))
def test_truncation_keeps_the_system_message_and_the_newest_whole_turns(
    conversation, n_ctx, max_tokens
):
    engine, backend = _scripted(n_ctx, "truncate_left")
    system = conversation[:1] if conversation[0]["role"] == "system" else []
    rest = conversation[len(system) :]
    fits = [
        n
        for n in range(len(rest))
        if rest[n]["role"] == "user"
        and len(engine._chat_ids([*system, *rest[n:]])) + max_tokens <= n_ctx
    ]
    if not fits:
        with pytest.raises(ContextOverflowError):
            engine.chat(conversation, max_tokens=max_tokens)
        return
    result = engine.chat(conversation, max_tokens=max_tokens)
    [start] = [c for c in backend.calls if c.method == "start"]
    expected = engine._chat_ids([*system, *rest[fits[0] :]])
    assert start.args["tokens"] == expected
    assert result.stats.truncated_tokens == len(engine._chat_ids(conversation)) - len(expected)
    assert result.text == "ok"[:max_tokens]


@settings(max_examples=100, deadline=None)
@given(conversation=conversations(), n_ctx=st.integers(8, 120))
def test_the_error_policy_never_drops_a_turn(conversation, n_ctx):
    engine, backend = _scripted(n_ctx, "error")
    needed = len(engine._chat_ids(conversation)) + 2
    if needed > n_ctx:
        with pytest.raises(ContextOverflowError):
            engine.chat(conversation, max_tokens=2)
    else:
        engine.chat(conversation, max_tokens=2)
        [start] = [c for c in backend.calls if c.method == "start"]
        assert start.args["tokens"] == engine._chat_ids(conversation)


def test_shift_protects_the_system_message():
    engine, _ = _scripted(64, "shift")
    conversation = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}]
    protected = engine._system_prefix(conversation)
    ids = engine._chat_ids(conversation)
    assert engine.detokenize(ids[1:protected]).endswith("<s>SYS<u>")
    assert engine._system_prefix(conversation[1:]) == 0
