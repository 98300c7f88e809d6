"""``edgegemma gateway`` against a real mosquitto broker on a free loopback port.

The gateway runs as the command a user runs, in its own process, so that it can be killed
with SIGKILL; readings and results go through the broker like any other client's. The broker
keeps its state on disk (persistence), so that it can be stopped and started again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from edgegemma.errors import InvalidParameterError
from edgegemma.skills import sensor

mqtt = pytest.importorskip("paho.mqtt.client")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
pytestmark = pytest.mark.skipif(
    not os.path.exists(MOSQUITTO), reason="needs Debian's mosquitto broker (setup.sh)"
)
SRC = Path(__file__).resolve().parents[1] / "src"
FILTER = "sensors/+/reading"


class Broker:
    """mosquitto on ``port``, its state in ``folder``; ``restart()`` keeps the state."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {folder}/\n"
            # Readings wait for a stopped gateway however many there are (the default keeps
            # only the first thousand of a persistent client's queue).
            "max_queued_messages 0\n"
            # As root mosquitto would switch to its own user, which cannot write the folder.
            "user root\n"
            f"log_dest file {folder}/mosquitto.log\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: mosquitto writes its state to disk
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Client:
    """A persistent MQTT client that records what arrives on ``subscribe``'s filter."""

    def __init__(self, port: int, client_id: str, subscribe: str | None = None):
        self.received: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.reconnect_delay_set(0.2, 1)
        if subscribe is not None:
            self.client.on_connect = lambda c, *_: c.subscribe(subscribe, qos=1)
            self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)  # the subscription is in place before readings go
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.received.append((message.topic, json.loads(message.payload)))

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1)

    def results(self) -> list[tuple[str, dict]]:
        with self.lock:
            return list(self.received)

    def wait_for(self, check, timeout: float = 120) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.results()
            if check(found):
                return found
            time.sleep(0.05)
        raise AssertionError(f"timed out; received {len(self.results())}: {self.results()[-3:]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    running = Broker(tmp_path, free_port())
    yield running
    running.stop()


@pytest.fixture
def clients(broker: Broker) -> Iterator[tuple[Client, Client]]:
    results = Client(broker.port, "test-results", subscribe="results/#")
    readings = Client(broker.port, "test-readings")
    yield results, readings
    results.close()
    readings.close()


def start_gateway(broker: Broker, gguf_path: Path, *extra: str) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "edgegemma",
        "gateway",
        "--broker",
        f"127.0.0.1:{broker.port}",
        "--in",
        FILTER,
        "--out",
        "results",
        "--skill",
        "sensor",
        "--model",
        str(gguf_path),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # the model is loaded and the gateway connecting
    assert line.startswith("edgegemma gateway:"), line + process.stdout.read()
    return process


def stop_gateway(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def reading(i: int) -> str:
    temp = (40, 80, 95)[i % 3]
    return json.dumps({"id": f"r{i}", "text": f"temp={temp}.{i % 10}C vib=0.2g"})


def answers(found: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The results among what arrived (not the errors, not the metrics)."""
    return [(topic, result) for topic, result in found if topic.startswith("results/sensors/")]


def errors_in(found: list[tuple[str, dict]]) -> list[dict]:
    return [result for topic, result in found if topic == "results/errors"]


def ids(found: list[tuple[str, dict]]) -> set[str]:
    return {result["id"] for _, result in answers(found)}


def test_readings_in_results_out(broker, clients, gguf_path):
    results, readings = clients
    gateway = start_gateway(broker, gguf_path)
    try:
        readings.publish("sensors/boiler/reading", "temp=95.2C vib=0.2g batt=3.9V")
        readings.publish(
            "sensors/fan/reading", json.dumps({"id": "fan-7", "text": "temp=41C hum=40%"})
        )
        found = answers(results.wait_for(lambda r: len(answers(r)) >= 2))
    finally:
        stop_gateway(gateway)
    by_topic = dict(found)
    boiler = by_topic["results/sensors/boiler/reading"]
    fan = by_topic["results/sensors/fan/reading"]
    assert fan["id"] == "fan-7" and len(boiler["id"]) == 16  # a hash of topic and payload
    assert boiler["label"] == "critical" and fan["label"] == "normal"
    for result in (boiler, fan):
        assert set(result) >= {"id", "label", "scores", "confidence", "latency_ms", "adapter"}
        assert result["model"] == gguf_path.name and len(result["adapter_version"]) == 12
        assert set(result["scores"]) == set(sensor.LABELS)
        assert sum(result["scores"].values()) == pytest.approx(1.0)
        assert result["confidence"] == max(result["scores"].values())
        assert result["adapter"] == "sensor" and result["latency_ms"] > 0
    assert gateway.returncode == 0


def test_bad_payloads_get_errors_and_the_gateway_goes_on(broker, clients, gguf_path):
    results, readings = clients
    gateway = start_gateway(broker, gguf_path)
    bad = [b"\xff\xfe not utf-8", b"{oops", b'{"id": 3}', b"x" * 70_000, b"   "]
    try:
        for payload in bad:
            readings.publish("sensors/broken/reading", payload)
        readings.publish("sensors/ok/reading", json.dumps({"id": "after", "text": "temp=80C"}))
        found = results.wait_for(lambda r: len(answers(r)) == 1 and len(errors_in(r)) == len(bad))
    finally:
        stop_gateway(gateway)
    errors = errors_in(found)
    assert len(errors) == len(bad)
    assert all(e["topic"] == "sensors/broken/reading" and e["error"] for e in errors)
    assert any("UTF-8" in e["error"] for e in errors) and any("JSON" in e["error"] for e in errors)
    [ok] = [result for topic, result in found if topic == "results/sensors/ok/reading"]
    assert ok["id"] == "after" and ok["label"] == "warning"


def test_a_killed_gateway_loses_no_reading(broker, clients, gguf_path):
    results, readings = clients
    count = 60
    gateway = start_gateway(broker, gguf_path)
    try:
        for i in range(count):
            readings.publish(f"sensors/d{i % 4}/reading", reading(i))
        results.wait_for(lambda r: len(answers(r)) >= 5)
        gateway.send_signal(signal.SIGKILL)  # mid-stream: some readings taken, not answered
        gateway.wait(timeout=10)
        assert len(ids(results.results())) < count
        gateway = start_gateway(broker, gguf_path)
        found = results.wait_for(lambda r: ids(r) >= {f"r{i}" for i in range(count)})
    finally:
        stop_gateway(gateway)
    for _, result in answers(found):
        i = int(result["id"][1:])
        assert result["label"] == sensor.label(json.loads(reading(i))["text"]), result


def test_a_broker_restart_loses_no_reading(broker, clients, gguf_path):
    results, readings = clients
    count = 40
    gateway = start_gateway(broker, gguf_path)
    try:
        for i in range(count // 2):
            readings.publish(f"sensors/d{i % 4}/reading", reading(i))
        results.wait_for(lambda r: len(answers(r)) >= 3)
        broker.restart()  # readings queued or in flight are kept on disk
        for i in range(count // 2, count):
            readings.publish(f"sensors/d{i % 4}/reading", reading(i))
        results.wait_for(lambda r: ids(r) >= {f"r{i}" for i in range(count)})
    finally:
        stop_gateway(gateway)


def test_two_routes_from_a_config_file(broker, clients, gguf_path, tmp_path):
    results, readings = clients
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[route]]\nin = "notes/#"\ntemplate = "Operator note: {text}"\n'
        "questions = [\n"
        '  {kind = "yesno", name = "urgent", condition = "Is help needed now?"},\n'
        '  {kind = "scale", name = "severity", instruction = "How severe?", low = 1, high = 3},\n'
        "]\n"
    )
    gateway = start_gateway(broker, gguf_path, "--config", str(config))
    try:
        readings.publish("sensors/a/reading", "batt=3.1V")
        readings.publish("notes/line2", json.dumps({"id": "n1", "text": "the pump is on fire"}))
        found = results.wait_for(lambda r: len([t for t, _ in r if t != "results/metrics"]) >= 2)
    finally:
        stop_gateway(gateway)
    by_topic = dict(found)
    assert by_topic["results/sensors/a/reading"]["label"] == "critical"
    note = by_topic["results/notes/line2"]
    assert note["id"] == "n1" and note["adapter"] is None
    assert note["label"] in ("yes", "no") and set(note["answers"]) == {"urgent", "severity"}
    assert 1 <= note["answers"]["severity"]["value"] <= 3


def test_config_errors_are_invalid_parameters(tmp_path):
    from edgegemma import gateway

    def config(*argv: str):
        return gateway.read_config(gateway.parser().parse_args(list(argv)))

    with pytest.raises(InvalidParameterError, match="broker"):
        config("--in", FILTER, "--skill", "sensor")
    with pytest.raises(InvalidParameterError, match="--skill"):
        config("--broker", "h:1883", "--in", FILTER)
    with pytest.raises(InvalidParameterError, match="no question"):
        config("--broker", "h:1883", "--in", FILTER, "--skill", "emoji")
    with pytest.raises(InvalidParameterError, match="HOST:PORT"):
        config("--broker", "h:port", "--in", FILTER, "--skill", "sensor")
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        'broker = "localhost:1884"\nout = "decisions"\n'
        '[[route]]\nin = "sensors/#"\nskill = "sensor"\n'
        '[[route]]\nin = "notes/#"\ntemplate = "Note: {text}"\n'
        'questions = [{kind = "yesno", name = "urgent", condition = "Is it urgent?"}]\n'
    )
    found = config("--config", str(toml))
    assert (found.host, found.port, found.out) == ("localhost", 1884, "decisions")
    assert [r.topic for r in found.routes] == ["sensors/#", "notes/#"]
    assert found.routes[0].adapter == "sensor" and found.routes[1].adapter is None
    toml.write_text('broker = "h:1"\n[[route]]\nin = "a"\nquestions = [{kind = "vote"}]\n')
    with pytest.raises(InvalidParameterError, match="kind"):
        config("--config", str(toml))


def test_parse_payload():
    from edgegemma.gateway import PayloadError, parse_payload

    assert parse_payload("t", b'{"id": 7, "text": " temp=1C "}') == ("7", "temp=1C")
    first = parse_payload("t", b"temp=1C")
    assert first == parse_payload("t", b"temp=1C") and first != parse_payload("u", b"temp=1C")
    for payload in (b"\xff", b"{", b"{}", b'{"text": 5}', b'{"text": "x", "id": [1]}', b""):
        with pytest.raises(PayloadError):
            parse_payload("t", payload)


def test_without_paho_the_command_says_which_extra():
    code = (
        "import sys; sys.modules['paho'] = None\n"
        "from edgegemma.cli import main\n"
        "sys.exit(main(['gateway', '--broker', 'h:1', '--in', 'a', '--skill', 'sensor']))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert found.returncode == 1 and "Traceback" not in found.stderr
    assert "edgegemma[gateway]" in found.stderr


def test_the_gateway_from_python(broker, clients, engine):
    """The pieces the command is made of, in a program: an engine, a route, a Gateway."""
    from edgegemma.gateway import Config, Gateway, skill_route

    results, readings = clients
    config = Config("127.0.0.1", broker.port, routes=(skill_route(FILTER, "sensor"),))
    gateway, stop, ready = Gateway(engine, config), threading.Event(), threading.Event()
    worker = threading.Thread(target=gateway.run, args=(stop, ready.set))
    worker.start()
    try:
        assert ready.wait(30)
        readings.publish("sensors/x/reading", "vib=0.9g")
        [(topic, result)] = answers(results.wait_for(lambda r: len(answers(r)) == 1))
    finally:
        stop.set()
        worker.join(30)
        engine.unload_adapter("sensor")
    assert topic == "results/sensors/x/reading" and result["label"] == "warning"
    assert gateway.metrics.readings == 1 and not worker.is_alive()
