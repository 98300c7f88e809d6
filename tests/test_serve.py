"""`edgegemma serve` with real clients: the official openai package, httpx and curl, against a
server process on a free local port, on the real model, on every backend."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import jsonschema
import pytest
from backend_kits import BACKENDS, backend_model
from conftest import PROMPT
from served import KEY, Served, start_server, stop_server

from edgegemma import skills

openai = pytest.importorskip("openai")

NAME = "gemma3-270m"
SENSOR = skills.examples("sensor", "test")[:6]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, gguf_path) -> Iterator:
    """``servers(backend)``: a server of the backend's model with the sensor adapter, one per
    backend and module (API key required)."""
    started: dict[str, Served] = {}
    logs = tmp_path_factory.mktemp("serve")

    def get(backend: str) -> Served:
        if backend not in started:
            adapter = skills.adapter_path("sensor", backend, model=str(gguf_path))
            started[backend] = start_server(
                logs,
                "--model", str(backend_model(backend, gguf_path)),
                "--backend", backend,
                "--name", NAME,
                "--adapter", f"sensor={adapter}",
                "--api-key", KEY,
                "--n-ctx", "512",
                "--threads", "2",
            )  # fmt: skip
        return started[backend]

    yield get
    for served in started.values():
        stop_server(served)


@pytest.fixture(scope="module")
def reference(engines, gguf_path):
    """``reference(backend)``: the in-process engine of the backend, with the sensor adapter."""

    def get(backend: str):
        engine, _ = engines(backend)
        if "sensor" not in engine.adapters:
            engine.load_adapter(
                "sensor", skills.adapter_path("sensor", backend, model=str(gguf_path))
            )
        return engine

    return get


# -- every backend -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_serves_chat_and_adapters_by_model_name(servers, reference, backend):
    served, engine = servers(backend), reference(backend)
    client = served.client()
    assert [m.id for m in client.models.list()] == [NAME, f"{NAME}:sensor"]

    answer = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    expected = engine.chat(CHAT, max_tokens=12, adapters=None)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == expected.stats.prompt_tokens
    assert answer.usage.completion_tokens == expected.stats.completion_tokens

    for example in SENSOR[:3]:
        with_adapter = client.completions.create(
            model=f"{NAME}:sensor", prompt=example.prompt, max_tokens=4, temperature=0
        )
        wanted = engine.generate(example.prompt, max_tokens=4, adapters={"sensor": 1.0})
        assert with_adapter.choices[0].text == wanted.text
        bare = client.completions.create(
            model=NAME, prompt=example.prompt, max_tokens=4, temperature=0
        )
        assert (
            bare.choices[0].text
            == engine.generate(example.prompt, max_tokens=4, adapters=None).text
        )

    pieces = client.chat.completions.create(
        model=f"{NAME}:sensor", messages=CHAT, max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
    assert streamed == engine.chat(CHAT, max_tokens=10, adapters={"sensor": 1.0}).text


# -- llama.cpp: the whole API --------------------------------------------------------------


@pytest.fixture(scope="module")
def served(servers) -> Served:
    return servers("llamacpp")


@pytest.fixture(scope="module")
def engine(reference):
    return reference("llamacpp")


def test_streamed_chat_reports_usage_and_ends_with_done(served, engine):
    client = served.client()
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected = engine.chat(CHAT, max_tokens=12, adapters=None)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_is_the_whole_completion(served, engine):
    client = served.client()
    pieces = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=10, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in pieces)
    assert text == engine.generate(PROMPT, max_tokens=10, adapters=None).text


def test_scales_and_adapter_sets_through_the_adapters_extension(served, engine):
    client = served.client()
    prompt = SENSOR[0].prompt
    half = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={"adapters": {"sensor": 0.5}},
    )
    assert (
        half.choices[0].text == engine.generate(prompt, max_tokens=6, adapters={"sensor": 0.5}).text
    )
    none = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=6, temperature=0, extra_body={"adapters": {}}
    )
    assert none.choices[0].text == engine.generate(prompt, max_tokens=6, adapters=None).text


def test_sampling_with_a_seed_is_reproducible(served):
    client = served.client()
    runs = [
        client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_stop_strings_end_the_completion(served, engine):
    client = served.client()
    full = engine.generate(PROMPT, max_tokens=12, adapters=None).text
    stop = full.split()[2]
    cut = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_are_the_engines(served, engine):
    client = served.client()
    answer = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    expected = engine.chat(CHAT, max_tokens=5, adapters=None, logprobs=3)
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content] == [lp.text for lp in expected.logprobs]
    for got, want in zip(content, expected.logprobs):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [t.text for t in want.top]
    legacy = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_response_format_json_schema(served):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "big": {"type": "boolean"}},
        "required": ["city", "big"],
        "additionalProperties": False,
    }
    client = served.client()
    answer = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Name a city as JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    anything = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "JSON please."}],
        max_tokens=24,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_fifty_concurrent_clients_with_different_adapters(served, engine):
    prompts = [e.prompt for e in SENSOR]
    models = [NAME, f"{NAME}:sensor"]
    expected = {
        (model, prompt): engine.generate(
            prompt, max_tokens=3, adapters={"sensor": 1.0} if model.endswith("sensor") else None
        ).text
        for model in models
        for prompt in prompts
    }
    answers: dict[int, tuple[str, str, str]] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        model, prompt = models[i % 2], prompts[i % len(prompts)]
        try:
            got = served.client().completions.create(
                model=model, prompt=prompt, max_tokens=3, temperature=0
            )
            answers[i] = (model, prompt, got.choices[0].text)
        except Exception as exc:  # noqa: BLE001 -- reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(answers) == 50
    for model, prompt, text in answers.values():
        assert text == expected[(model, prompt)], (model, prompt)


def test_a_client_that_leaves_mid_stream_cancels_its_generation(served, engine):
    before = served.health()["generations"].get("cancelled", 0)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", json=body, headers=headers
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
        assert received
    deadline = time.monotonic() + 60
    while served.health()["generations"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.1)
    answer = served.client().completions.create(
        model=NAME, prompt=PROMPT, max_tokens=6, temperature=0
    )
    assert answer.choices[0].text == engine.generate(PROMPT, max_tokens=6, adapters=None).text


def test_parallel_requests_run_as_one_batch(tmp_path, gguf_path, engine):
    served = start_server(
        tmp_path,
        "--model", str(gguf_path),
        "--name", NAME,
        "--adapter", f"sensor={skills.adapter_path('sensor', model=str(gguf_path))}",
        "--n-ctx", "1024",
        "--threads", "2",
        "--parallel", "8",
    )  # fmt: skip
    try:
        assert served.health()["parallel"] == 8
        url = f"{served.url}/v1/completions"
        prompts = [e.prompt for e in SENSOR] + [e.prompt for e in SENSOR[:2]]
        answers: dict[int, dict] = {}
        errors: list[BaseException] = []

        def ask(i: int) -> None:
            body = {"model": f"{NAME}:sensor", "prompt": prompts[i], "max_tokens": 3,
                    "temperature": 0}  # fmt: skip
            try:
                answers[i] = httpx.post(url, json=body, timeout=120).raise_for_status().json()
            except Exception as exc:  # noqa: BLE001 -- reported below, with the others
                errors.append(exc)

        # A long request holds the worker while the eight arrive; they then run together.
        long = {"model": NAME, "prompt": PROMPT, "max_tokens": 150, "temperature": 0}
        holder = threading.Thread(target=lambda: httpx.post(url, json=long, timeout=120))
        holder.start()
        time.sleep(0.5)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads + [holder]:
            t.join()
        assert not errors, errors[:3]
        assert max(a["timings"]["batch_n"] for a in answers.values()) == len(prompts)
        for i, found in answers.items():
            wanted = engine.generate(prompts[i], max_tokens=3, adapters={"sensor": 1.0})
            # Batched rows round differently in llama.cpp's kernels (docs/design/engine.md, Batches): the
            # label, not every byte, is what a batch must keep.
            text = found["choices"][0]["text"]
            assert skills.sensor_label(text) == skills.sensor_label(wanted.text), (text, wanted)
    finally:
        stop_server(served)


def test_a_request_arriving_while_a_batch_runs_joins_it(tmp_path, gguf_path):
    served = start_server(
        tmp_path,
        "--model", str(gguf_path),
        "--name", NAME,
        "--n-ctx", "1024",
        "--threads", "2",
        "--parallel", "8",
    )  # fmt: skip
    try:
        url = f"{served.url}/v1/completions"
        replies: dict[object, tuple[httpx.Response, float]] = {}

        def post(key: object, body: dict) -> threading.Thread:
            def send() -> None:
                response = httpx.post(url, json=body, timeout=300)
                replies[key] = response, time.monotonic()

            thread = threading.Thread(target=send)
            thread.start()
            return thread

        # A request with other sampling settings (top_k) holds the worker while four long ones
        # and one that cannot fit the context arrive; the four then run as a batch, and a
        # short request sent while they run joins it and is answered before they end.
        holder = post("holder", {"model": NAME, "prompt": PROMPT, "max_tokens": 100,
                                 "temperature": 0, "top_k": 5})  # fmt: skip
        time.sleep(0.5)
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 120, "temperature": 0}
        longs = [post(i, body) for i in range(4)]
        overflow = post("overflow", {"model": NAME, "prompt": PROMPT, "max_tokens": 5000})
        holder.join()
        overflow.join()
        time.sleep(1.0)
        short = post("short", {"model": NAME, "prompt": "Water boils at", "max_tokens": 4,
                               "temperature": 0})  # fmt: skip
        for thread in [short, *longs]:
            thread.join()
        failed, _ = replies["overflow"]
        assert failed.status_code == 400
        assert failed.json()["error"]["code"] == "context_length_exceeded"
        answer, answered_at = replies["short"]
        assert answer.status_code == 200, answer.text
        assert answer.json()["timings"]["batch_n"] == 5
        assert answer.json()["usage"]["completion_tokens"] == 4
        for i in range(4):
            response, ended_at = replies[i]
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 120
            assert response.json()["timings"]["batch_n"] == 4
            assert answered_at < ended_at, "the short request waited for the batch to end"
        assert served.health()["generations"]["length"] >= 6
    finally:
        stop_server(served)


def test_prefix_cache_always_reuses_the_previous_answer(tmp_path, gguf_path):
    # A chat's next turn starts with the previous answer: under the default "exact" its tokens
    # are evaluated again (docs/design/reliability.md), under --prefix-cache always they are reused.
    served = start_server(
        tmp_path, "--model", str(gguf_path), "--name", NAME, "--n-ctx", "1024",
        "--threads", "2", "--prefix-cache", "always",
    )  # fmt: skip
    try:
        assert served.health()["prefix_cache"] == "always"
        url = f"{served.url}/v1/chat/completions"
        messages = [{"role": "user", "content": "Tell me about the sea."}]
        first = httpx.post(
            url, json={"model": NAME, "messages": messages, "max_tokens": 16}, timeout=120
        ).json()
        messages += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        second = httpx.post(
            url, json={"model": NAME, "messages": messages, "max_tokens": 4}, timeout=120
        ).json()
        assert second["timings"]["cache_n"] > first["usage"]["prompt_tokens"]
    finally:
        stop_server(served)


# -- misuse ----------------------------------------------------------------------------------

GOOD_CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MISUSE = [
    # (why, method, path, body (dict, or bytes sent raw), headers, status, error code)
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": ', {}, 400, None),
    ("a JSON array", "POST", "/v1/chat/completions", b"[1, 2]", {}, 400, None),
    ("an unknown field", "POST", "/v1/chat/completions", {**GOOD_CHAT, "frobnicate": 1}, {}, 400, None),
    ("a wrong type", "POST", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": "2"}, {}, 400, None),
    ("no messages field", "POST", "/v1/chat/completions", {"model": NAME}, {}, 400, None),
    ("an unknown role", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, {}, 400, None),
    ("an unknown model", "POST", "/v1/chat/completions", {**GOOD_CHAT, "model": "gpt-4o"}, {},
     404, "model_not_found"),
    ("an unknown adapter", "POST", "/v1/completions",
     {"model": f"{NAME}:nope", "prompt": "x"}, {}, 404, "model_not_found"),
    ("an unknown adapter in adapters", "POST", "/v1/completions",
     {"model": NAME, "prompt": "x", "adapters": {"nope": 1.0}}, {}, 404, "model_not_found"),
    ("adapter named twice", "POST", "/v1/completions",
     {"model": f"{NAME}:sensor", "prompt": "x", "adapters": {"sensor": 1.0}}, {}, 400, None),
    ("a prompt over the context", "POST", "/v1/completions",
     {"model": NAME, "prompt": "word " * 2000, "max_tokens": 4}, {}, 400, "context_length_exceeded"),
    ("a chat over the context", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "user", "content": "word " * 2000}]}, {}, 400,
     "context_length_exceeded"),
    ("a streamed prompt over the context", "POST", "/v1/completions",
     {"model": NAME, "prompt": "word " * 2000, "stream": True}, {}, 400, "context_length_exceeded"),
    ("negative max_tokens", "POST", "/v1/completions",
     {"model": NAME, "prompt": "x", "max_tokens": -1}, {}, 400, "invalid_value"),
    ("temperature out of range", "POST", "/v1/completions",
     {"model": NAME, "prompt": "x", "temperature": -1.0}, {}, 400, "invalid_value"),
    ("n of two", "POST", "/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, {}, 400,
     "invalid_value"),
    ("a token id out of range", "POST", "/v1/completions",
     {"model": NAME, "prompt": [2, 10**7]}, {}, 400, "invalid_value"),
    ("roles not alternating", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     {}, 400, "invalid_value"),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions",
     {**GOOD_CHAT, "top_logprobs": 2}, {}, 400, "invalid_value"),
    ("a missing API key", "POST", "/v1/chat/completions", GOOD_CHAT, {"Authorization": None},
     401, "invalid_api_key"),
    ("a wrong API key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401,
     "invalid_api_key"),
    ("an unknown path", "GET", "/v1/engines", None, {}, 404, "not_found"),
    ("a wrong method", "DELETE", "/v1/models", None, {}, 405, "method_not_allowed"),
    ("a body over the limit", "POST", "/v1/completions",
     {"model": NAME, "prompt": "x" * (5 << 20)}, {}, 413, "request_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("why", "method", "path", "body", "headers", "status", "code"),
    MISUSE,
    ids=[m[0] for m in MISUSE],
)
def test_misuse_gets_an_openai_error_and_the_server_stays_up(
    served, why, method, path, body, headers, status, code
):
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    sent = {k: v for k, v in sent.items() if v is not None}
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    response = httpx.request(method, served.url + path, content=content, headers=sent, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    assert served.health()["status"] == "ok"
    ok = httpx.post(
        f"{served.url}/v1/chat/completions",
        json=GOOD_CHAT,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert ok.status_code == 200


def test_a_chunked_body_over_the_limit_is_refused(served):
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "' + NAME.encode() + b'", "prompt": "'
        for _ in range(6):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(
        f"{served.url}/v1/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_the_openai_client_raises_its_own_errors(served):
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        served.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=-3)


def test_curl(served, engine):
    if shutil.which("curl") is None:
        pytest.fail("curl is needed for this test: apt-get install curl (setup.sh does this)")
    base = [
        "curl",
        "-sS",
        "-H",
        f"Authorization: Bearer {KEY}",
        "-H",
        "Content-Type: application/json",
    ]
    body = json.dumps({"model": NAME, "messages": CHAT, "max_tokens": 8, "temperature": 0})
    done = subprocess.run(
        [*base, "-d", body, f"{served.url}/v1/chat/completions"], capture_output=True, check=True
    )
    answer = json.loads(done.stdout)
    assert (
        answer["choices"][0]["message"]["content"]
        == engine.chat(CHAT, max_tokens=8, adapters=None).text
    )
    streamed = subprocess.run(
        [*base, "-N", "-d", json.dumps({**json.loads(body), "stream": True}),
         f"{served.url}/v1/chat/completions"],
        capture_output=True, check=True, text=True,
    )  # fmt: skip
    events = [
        line[len("data: ") :] for line in streamed.stdout.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == answer["choices"][0]["message"]["content"]
    denied = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{served.url}/v1/models"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert denied.stdout == "401"


def test_without_the_server_extra_the_command_says_what_to_install():
    blocked = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from edgegemma.cli import main; sys.exit(main(['serve']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "pip install 'edgegemma[serve]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_it_binds_to_localhost_by_default():
    from edgegemma.serve.cli import _parser

    options = _parser().parse_args([])
    assert options.host == "127.0.0.1"


# -- fault injection: hostile hosts, bad options, slow bodies ----------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, gguf_path) -> Iterator[Served]:
    """A server with a key, the default Host check, a one-second body timeout, and room for
    four requests together."""
    served = start_server(
        tmp_path_factory.mktemp("guarded"),
        "--model", str(gguf_path), "--api-key", KEY, "--n-ctx", "1024", "--threads", "2",
        "--body-timeout", "1", "--parallel", "4", "--name", NAME,
    )  # fmt: skip
    yield served
    stop_server(served)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", ""])
def test_a_request_naming_another_host_is_refused(guarded, host):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1."""
    answer = httpx.get(
        f"{guarded.url}/v1/models", headers={"Host": host, "Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "host_not_allowed"
    for good in ("localhost", f"127.0.0.1:{guarded.url.rsplit(':', 1)[1]}", "[::1]:1"):
        ok = httpx.get(
            f"{guarded.url}/v1/models", headers={"Host": good, "Authorization": f"Bearer {KEY}"}
        )
        assert ok.status_code == 200, good


def test_an_empty_bearer_token_is_refused(guarded):
    for header in ("Bearer", "bearer", f"Basic {KEY}", f"Bearer {KEY}x"):
        answer = httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": header})
        assert answer.status_code == 401, header


def test_a_body_that_never_arrives_is_timed_out_and_the_server_stays_up(guarded):
    with socket.create_connection(("127.0.0.1", int(guarded.url.rsplit(":", 1)[1]))) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            b'Content-Length: 4000000\r\n\r\n{"prompt": '
        )
        raw.settimeout(30)
        started = time.monotonic()
        reply = b""
        while chunk := raw.recv(65536):  # the server closes the connection after its answer
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within 1 s" in reply and time.monotonic() - started < 20
    assert guarded.health()["status"] == "ok"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--api-key", ""], "the API key must be non-empty"),
        (["--api-key", " key"], "the API key must be non-empty"),
        (["--port", "99999"], "a port is a number from 0 to 65535"),
        (["--port", "-1"], "a port is a number from 0 to 65535"),
        (["--max-body-bytes", "-1"], "must be positive"),
        (["--max-body-bytes", "0"], "must be positive"),
        (["--body-timeout", "nan"], "must be positive"),
    ],
)
def test_bad_serve_options_are_refused_before_the_model_loads(args, said):
    done = subprocess.run(
        [sys.executable, "-m", "edgegemma", "serve", *args],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr


def test_serving_beyond_this_machine_without_a_key_is_said():
    from edgegemma.serve import exposure_warning

    assert "without --api-key" in str(exposure_warning("0.0.0.0", None))
    assert exposure_warning("0.0.0.0", "k") is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None


def test_a_failing_constraint_ends_its_own_request_only(guarded):
    """Under --parallel, a request whose constraint has no way forward gets its 400; the
    requests batched with it are answered in full, as they would be alone."""
    headers = {"Authorization": f"Bearer {KEY}"}
    good = {"model": NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    alone = httpx.post(f"{guarded.url}/v1/completions", json=good, headers=headers, timeout=120)
    bad = {
        "model": NAME,
        "messages": [{"role": "user", "content": "JSON"}],
        "max_tokens": 24,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"$ref": "#"}},
        },
    }
    answers: dict[str, httpx.Response] = {}

    def send(name: str, path: str, body: dict) -> None:
        answers[name] = httpx.post(f"{guarded.url}{path}", json=body, headers=headers, timeout=120)

    threads = [
        threading.Thread(target=send, args=("good1", "/v1/completions", good)),
        threading.Thread(target=send, args=("bad", "/v1/chat/completions", bad)),
        threading.Thread(target=send, args=("good2", "/v1/completions", good)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers["bad"].status_code == 400
    assert "admits no further text" in answers["bad"].json()["error"]["message"]
    for name in ("good1", "good2"):
        assert answers[name].status_code == 200
        choice = answers[name].json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (
            alone.json()["choices"][0]["text"],
            "length",
        )
    nan = {
        **bad,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"const": math.nan}},
        },
    }
    refused = httpx.post(
        f"{guarded.url}/v1/chat/completions",
        content=json.dumps(nan),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert refused.status_code == 400 and "NaN" in refused.text


def test_streamed_completions_refuse_logprobs_instead_of_sending_null(guarded):
    body = {
        "model": "gemma3-270m",
        "prompt": PROMPT,
        "max_tokens": 4,
        "stream": True,
        "logprobs": 2,
    }
    answer = httpx.post(
        f"{guarded.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "logprobs"


def _leave_after(served: Served, body: dict, seconds: float) -> None:
    """Send a non-streamed request, then close the connection without reading the answer."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1]))) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data) + data
        )
        time.sleep(seconds)


@pytest.mark.parametrize("prompts", [1, 50])
def test_a_client_that_leaves_a_non_streamed_request_cancels_it(guarded, prompts):
    """Watched from the start: the generation running is cancelled at its next token and the
    request's later prompts never start (before, a lone request ran to its end)."""
    before = guarded.health()["generations"]
    body = {
        "model": NAME,
        "prompt": [PROMPT] * prompts if prompts > 1 else PROMPT,
        "max_tokens": 600,
    }
    _leave_after(guarded, body, 1.0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = guarded.health()["generations"]
        if after.get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.2)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert sum(after.values()) - sum(before.values()) == 1, "no later prompt started"


def test_bodies_trickling_in_from_many_clients_are_bounded_together(tmp_path, gguf_path):
    """Each body is under the limit, but together they may hold at most 16 bodies' worth:
    the rest get 503 and the server stays up and answers afterwards."""
    served = start_server(
        tmp_path, "--model", str(gguf_path), "--n-ctx", "256", "--max-body-bytes", "1000",
        "--body-timeout", "20", "--name", NAME,
    )  # fmt: skip
    port = int(served.url.rsplit(":", 1)[1])
    sockets = []
    try:
        for _ in range(24):
            raw = socket.create_connection(("127.0.0.1", port))
            raw.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b" " * 900
            )
            sockets.append(raw)
        time.sleep(1.0)
        busy = 0
        for raw in sockets:
            raw.settimeout(0.2)
            try:
                busy += raw.recv(100).startswith(b"HTTP/1.1 503")
            except TimeoutError:
                pass  # still receiving: within the bound
        assert 24 - 17 <= busy <= 24 - 16
    finally:
        for raw in sockets:
            raw.close()
        answer = httpx.post(
            f"{served.url}/v1/completions",
            json={"model": NAME, "prompt": PROMPT, "max_tokens": 2},
            timeout=60,
        )
        stop_server(served)
    assert answer.status_code == 200


HOSTILE_TEMPLATE = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
)


def test_a_model_whose_template_never_ends_answers_400_and_the_worker_goes_on(tmp_path, gguf_path):
    """A chat template is the model file's code: one that loops 10^10 times is stopped at the
    time limit, its request answered 400, and the requests after it are served."""
    template = tmp_path / "template.jinja"
    template.write_text(HOSTILE_TEMPLATE)
    model = tmp_path / "hostile.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gguf_path), str(model),
         "--chat-template-file", str(template), "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    served = start_server(tmp_path, "--model", str(model), "--n-ctx", "256", "--name", NAME)
    try:
        started = time.monotonic()
        chat = httpx.post(
            f"{served.url}/v1/chat/completions",
            json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert chat.status_code == 400 and "longer than 5 s" in chat.json()["error"]["message"]
        assert time.monotonic() - started < 30
        completion = httpx.post(
            f"{served.url}/v1/completions",
            json={"model": NAME, "prompt": PROMPT, "max_tokens": 2},
            timeout=60,
        )
        assert completion.status_code == 200 and served.health()["status"] == "ok"
    finally:
        stop_server(served)
