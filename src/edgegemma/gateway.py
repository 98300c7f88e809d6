"""``edgegemma gateway``: label MQTT readings with calibrated decisions, every reading accounted for.

    edgegemma gateway --broker HOST:PORT --in 'sensors/+/reading' --out results --skill sensor

Each topic filter is routed to a skill (its adapter) and a question or schema
(:mod:`edgegemma.decisions`); everything beyond the minimal command lives in a TOML file
(``--config``, docs/gateway.md). A reading is UTF-8 text, or JSON with ``text`` and an
optional ``id``; its result, one JSON object, goes to ``<out>/<input topic>``, and a reading
that cannot be answered gets an error object on ``<out>/errors``.

Delivery is at least once: the gateway subscribes at QoS 1 in a persistent session (a fixed
client id, no clean start) and acknowledges a reading only once the broker has acknowledged
its result, so a reading taken but not answered when the gateway or the broker dies is
delivered again. A reading answered twice carries the same ``id`` both times.
"""

from __future__ import annotations

try:
    import paho.mqtt.client as mqtt
except ModuleNotFoundError as exc:  # the gateway is an optional extra
    raise ModuleNotFoundError(
        f"edgegemma gateway needs {exc.name}: pip install 'edgegemma[gateway]'", name=exc.name
    ) from None

import argparse
import hashlib
import json
import logging
import queue
import signal
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .decisions import Choice, Decisions, Question, Scale, Schema, YesNo, schema_of
from .engine import Engine
from .errors import EdgeGemmaError, InvalidParameterError
from .files import sha256_file
from .models import default_model

log = logging.getLogger("edgegemma.gateway")

DEFAULT_CLIENT_ID = "edgegemma-gateway"
MAX_PAYLOAD_BYTES = 64 * 1024
"""Readings larger than this are refused with an error result: a reading is a line of
sensor text, and a huge payload would only fill the context window."""


class PayloadError(EdgeGemmaError):
    """A reading the gateway cannot answer (not UTF-8, too large, bad JSON, no text)."""


@dataclass(frozen=True)
class Route:
    """Readings on ``topic`` (an MQTT filter, ``+`` and ``#`` allowed) and how to answer them."""

    topic: str
    schema: Schema
    adapter: str | None = None
    """The name the route's adapter is loaded under (a shipped skill's name), or None."""
    adapter_path: Path | None = None


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    routes: tuple[Route, ...]
    out: str = "results"
    client_id: str = DEFAULT_CLIENT_ID
    model: str | None = None
    backend: str | None = None
    batch: int = 8
    """Readings answered together at most (one ``decide_many``)."""
    batch_ms: float = 20.0
    """How long the first reading of a batch waits for others."""
    metrics_s: float = 10.0
    """Seconds between two metrics messages on ``<out>/metrics``; 0: none."""
    max_bytes: int = MAX_PAYLOAD_BYTES
    keepalive: int = 30


@dataclass
class _Reading:
    message: mqtt.MQTTMessage
    received: float
    route: Route | None = None
    id: str = ""
    text: str = ""


@dataclass
class Metrics:
    """Counts since start and the latencies of the last few hundred readings."""

    readings: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))

    def snapshot(self, queued: int) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)

        def at(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "readings": self.readings,
            "errors": self.errors,
            "readings_per_s": self.readings / elapsed,
            "latency_ms_p50": at(0.5),
            "latency_ms_p99": at(0.99),
            "queue": queued,
        }


# -- readings -------------------------------------------------------------------------------


def parse_payload(
    topic: str, payload: bytes | bytearray, max_bytes: int = MAX_PAYLOAD_BYTES
) -> tuple[str, str]:
    """The ``(id, text)`` of a reading. JSON objects give their ``text`` and ``id``; any other
    payload is the text itself, and its id is a hash of topic and payload, the same on every
    delivery of it."""
    fallback = hashlib.sha256(topic.encode() + b"\0" + bytes(payload)).hexdigest()[:16]
    if len(payload) > max_bytes:
        raise PayloadError(f"the payload has {len(payload)} bytes; at most {max_bytes} are read")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"the payload is not UTF-8 text: {exc}") from None
    if text.lstrip().startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PayloadError(f"the payload is not valid JSON: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise PayloadError('a JSON reading must be an object with a "text" string')
        given = record.get("id")
        if given is not None and not isinstance(given, (str, int)):
            raise PayloadError('a JSON reading\'s "id" must be a string or an integer')
        text = record["text"]
        fallback = str(given) if given is not None else fallback
    if not text.strip():
        raise PayloadError("the reading has no text")
    return fallback, text.strip()


def result_of(
    reading_id: str, found: Decisions, route: Route, latency_ms: float, model: str
) -> dict[str, Any]:
    """The JSON result of a reading: the first question's answer at the top, every question's
    under ``answers`` when the schema has several."""
    first = found[route.schema.questions[0].name]
    result: dict[str, Any] = {
        "id": reading_id,
        "label": first.label,
        "scores": first.scores,
        "confidence": first.confidence,
        "abstained": first.abstained,
        "latency_ms": round(latency_ms, 2),
        "adapter": route.adapter,
        "model": model,
    }
    if first.value is not None:
        result["value"] = first.value
    if len(route.schema.questions) > 1:
        result["answers"] = {
            name: {
                "label": d.label,
                "scores": d.scores,
                "confidence": d.confidence,
                "abstained": d.abstained,
                **({"value": d.value} if d.value is not None else {}),
            }
            for name, d in found.answers.items()
        }
    return result


# -- configuration -----------------------------------------------------------------------------


def skill_route(topic: str, skill: str) -> Route:
    """A route answering ``topic``'s readings with a shipped skill's adapter and question."""
    from . import skills

    if skill not in skills.QUESTIONS:
        known = ", ".join(skills.QUESTIONS)
        raise InvalidParameterError(
            f"the skill {skill!r} has no question; skills with one: {known}"
        )
    return Route(topic, skills.QUESTIONS[skill], skill, skills.adapter_path(skill))


def _question(table: dict[str, Any]) -> Question:
    kinds: dict[str, type[Choice | YesNo | Scale]] = {
        "choice": Choice,
        "yesno": YesNo,
        "scale": Scale,
    }
    fields = dict(table)
    kind = fields.pop("kind", "choice")
    if kind not in kinds:
        raise InvalidParameterError(f"a question's kind is choice, yesno or scale, got {kind!r}")
    for key in ("labels", "descriptions"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    try:
        return kinds[kind](**fields)
    except TypeError as exc:
        raise InvalidParameterError(f"bad {kind} question {table!r}: {exc}") from None


def _route(table: dict[str, Any], where: str) -> Route:
    topic = table.get("in")
    if not isinstance(topic, str) or not topic:
        raise InvalidParameterError(f"{where}: every route needs an `in` topic filter")
    skill = table.get("skill")
    questions = table.get("questions")
    if questions is None:
        if not isinstance(skill, str):
            raise InvalidParameterError(f"{where}: a route needs a skill or questions")
        return skill_route(topic, skill)
    if not isinstance(questions, list) or not all(isinstance(q, dict) for q in questions):
        raise InvalidParameterError(f"{where}: questions must be a list of tables")
    schema = schema_of(
        Schema(tuple(_question(q) for q in questions), template=table.get("template", "{text}"))
    )
    adapter_path = table.get("adapter")
    if skill is not None:
        from . import skills

        return Route(topic, schema, skill, skills.adapter_path(skill))
    if adapter_path is not None:
        path = Path(adapter_path)
        return Route(topic, schema, table.get("adapter_name", path.stem), path)
    return Route(topic, schema)


def read_config(args: argparse.Namespace) -> Config:
    """The command line over the config file (``--config``), checked."""
    table: dict[str, Any] = {}
    if args.config is not None:
        try:
            table = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidParameterError(f"cannot read the config {args.config}: {exc}") from None
    broker = args.broker or table.get("broker")
    if not isinstance(broker, str) or not broker:
        raise InvalidParameterError("give the broker: --broker HOST:PORT (or broker in the config)")
    host, _, port_text = broker.rpartition(":") if ":" in broker else (broker, ":", "1883")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidParameterError(f"the broker must be HOST:PORT, got {broker!r}")
    routes = [_route(r, f"{args.config}: route {i}") for i, r in enumerate(table.get("route", []))]
    for topic in args.topics or []:
        if args.skill is None:
            raise InvalidParameterError("--in needs --skill (or routes in the config file)")
        routes.append(skill_route(topic, args.skill))
    if not routes:
        raise InvalidParameterError("nothing to subscribe to: give --in and --skill, or routes")
    out = args.out or table.get("out", "results")
    if not isinstance(out, str) or not out or any(c in out for c in "+#"):
        raise InvalidParameterError(f"--out must be a topic prefix without wildcards, got {out!r}")
    config = Config(
        host=host or "localhost",
        port=int(port_text),
        routes=tuple(routes),
        out=out.rstrip("/"),
        client_id=args.client_id or table.get("client_id", DEFAULT_CLIENT_ID),
        model=args.model or table.get("model"),
        backend=args.backend or table.get("backend"),
        batch=args.batch if args.batch is not None else table.get("batch", 8),
        batch_ms=table.get("batch_ms", 20.0),
        metrics_s=table.get("metrics_s", 10.0),
        max_bytes=table.get("max_bytes", MAX_PAYLOAD_BYTES),
    )
    _check_number("batch", config.batch, 1, 256, integer=True)
    _check_number("batch_ms", config.batch_ms, 0, 10_000)
    _check_number("metrics_s", config.metrics_s, 0, 86_400)
    _check_number("max_bytes", config.max_bytes, 1, 256 * 1024 * 1024, integer=True)
    if not isinstance(config.client_id, str) or not config.client_id:
        raise InvalidParameterError(
            f"client_id must be a non-empty string, got {config.client_id!r}"
        )
    for name in ("model", "backend"):
        if getattr(config, name) is not None and not isinstance(getattr(config, name), str):
            raise InvalidParameterError(f"{name} must be a string")
    return config


def _check_number(
    name: str, value: object, low: float, high: float, *, integer: bool = False
) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise InvalidParameterError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")


# -- the gateway -------------------------------------------------------------------------------


class Gateway:
    """An MQTT client answering readings with ``engine``, one batch at a time.

    The network thread of paho only queues readings; :meth:`run` answers them in the calling
    thread. The broker's limit on unacknowledged messages per client bounds that queue: as a
    reading is acknowledged only when answered, a slow gateway slows the broker's deliveries
    to it instead of dropping readings.
    """

    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.metrics = Metrics()
        self._inbox: queue.Queue[_Reading] = queue.Queue()
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        """Set once the broker has confirmed the subscriptions (readings are kept from then)."""
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=False,  # the broker keeps the subscription and unacknowledged readings
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        for route in config.routes:
            if route.adapter is not None and route.adapter not in engine.adapters:
                assert route.adapter_path is not None
                engine.load_adapter(route.adapter, route.adapter_path)
        for route in config.routes:
            engine.prewarm(route.schema, adapters=_adapters(route))
        # The model's name as the user gave it (a cached build's file is named model.gguf),
        # and each adapter's version: the start of its file's hash.
        self.model = Path(config.model).name if config.model else default_model(config.backend)
        self.versions: dict[str | None, str] = {
            route.adapter: sha256_file(route.adapter_path)[:12]
            for route in config.routes
            if route.adapter is not None and route.adapter_path is not None
        }

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("the broker refused the connection: %s", reason)
            return
        # Subscribing again on every connection is harmless in a kept session and needed in a
        # new one (a broker restarted without persistence).
        client.subscribe([(route.topic, 1) for route in self.config.routes])
        log.info("connected to %s:%d", self.config.host, self.config.port)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, properties: Any
    ) -> None:
        log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: Any, properties: Any
    ) -> None:
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            log.error("the broker refused a subscription: %s", ", ".join(map(str, refused)))
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(_Reading(message, time.perf_counter()))

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Answer readings until ``stop`` is set; the batch in hand is finished first.
        ``on_ready`` is called once the broker has confirmed the subscriptions."""
        self._stop = stop
        self.client.connect_async(
            self.config.host, self.config.port, keepalive=self.config.keepalive
        )
        self.client.loop_start()
        while on_ready is not None and not stop.is_set():
            if self.subscribed.wait(0.2):
                on_ready()
                break
        next_metrics = time.monotonic() + self.config.metrics_s
        try:
            while not stop.is_set():
                batch = self._take(stop)
                if batch:
                    self.answer(batch)
                if self.config.metrics_s and time.monotonic() >= next_metrics:
                    self._publish(
                        f"{self.config.out}/metrics",
                        self.metrics.snapshot(self._inbox.qsize()),
                        qos=0,
                    )
                    next_metrics = time.monotonic() + self.config.metrics_s
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def _take(self, stop: threading.Event) -> list[_Reading]:
        try:
            first = self._inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.config.batch_ms / 1000
        while len(batch) < self.config.batch and not stop.is_set():
            left = deadline - time.perf_counter()
            try:
                batch.append(
                    self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def answer(self, batch: Sequence[_Reading]) -> None:
        """Answer ``batch``: results and errors published, then the readings acknowledged."""
        sent: list[tuple[_Reading, mqtt.MQTTMessageInfo]] = []
        good: list[_Reading] = []
        for reading in batch:
            message = reading.message
            try:
                reading.id, reading.text = parse_payload(
                    message.topic, message.payload, self.config.max_bytes
                )
                reading.route = self._route(message.topic)
            except PayloadError as exc:
                sent.append((reading, self._error(reading, str(exc))))
                continue
            good.append(reading)
        by_route: dict[int, list[_Reading]] = {}
        for reading in good:
            by_route.setdefault(id(reading.route), []).append(reading)
        for group in by_route.values():
            route = group[0].route
            assert route is not None
            try:
                found = self.engine.decide_many(
                    [r.text for r in group], route.schema, adapters=_adapters(route)
                )
            except EdgeGemmaError as exc:
                # One reading (too long for the context, say) must not sink its batch.
                if len(group) > 1:
                    for reading in group:
                        self.answer_one(reading, sent)
                    continue
                sent.append((group[0], self._error(group[0], str(exc))))
                continue
            for reading, decisions in zip(group, found):
                sent.append((reading, self._result(reading, decisions)))
        self._acknowledge(sent, self._stop)

    def answer_one(
        self, reading: _Reading, sent: list[tuple[_Reading, mqtt.MQTTMessageInfo]]
    ) -> None:
        route = reading.route
        assert route is not None
        try:
            found = self.engine.decide(reading.text, route.schema, adapters=_adapters(route))
        except EdgeGemmaError as exc:
            sent.append((reading, self._error(reading, str(exc))))
            return
        sent.append((reading, self._result(reading, found)))

    def _route(self, topic: str) -> Route:
        for route in self.config.routes:
            if mqtt.topic_matches_sub(route.topic, topic):
                return route
        raise PayloadError(f"no route takes the topic {topic!r}")

    def _result(self, reading: _Reading, found: Decisions) -> mqtt.MQTTMessageInfo:
        assert reading.route is not None
        latency_ms = (time.perf_counter() - reading.received) * 1000
        self.metrics.readings += 1
        self.metrics.latencies_ms.append(latency_ms)
        payload = result_of(reading.id, found, reading.route, latency_ms, self.model)
        payload["adapter_version"] = self.versions.get(reading.route.adapter)
        return self._publish(f"{self.config.out}/{reading.message.topic}", payload)

    def _error(self, reading: _Reading, error: str) -> mqtt.MQTTMessageInfo:
        self.metrics.errors += 1
        message = reading.message
        log.info("reading on %s refused: %s", message.topic, error)
        payload = {"id": reading.id or None, "topic": message.topic, "error": error}
        return self._publish(f"{self.config.out}/errors", payload)

    def _publish(self, topic: str, payload: dict[str, Any], qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, json.dumps(payload), qos=qos)

    def _acknowledge(
        self, sent: list[tuple[_Reading, mqtt.MQTTMessageInfo]], stop: threading.Event
    ) -> None:
        """Acknowledge each reading once the broker has its result. While the broker is away
        the results wait in paho's queue and go out on reconnection; the readings wait too.
        Stopping while the broker is away leaves the rest unacknowledged: the broker delivers
        them again to the next run."""
        for reading, info in sent:
            while not _delivered(info):
                if stop.is_set() and not self.client.is_connected():
                    return
                time.sleep(0.005)
            self.client.ack(reading.message.mid, reading.message.qos)


def _delivered(info: mqtt.MQTTMessageInfo) -> bool:
    # A message published while disconnected is queued and sent on reconnection, but its info
    # keeps the "no connection" code, for which is_published() raises: the broker's
    # acknowledgement is then read from the flag paho sets when it arrives.
    try:
        return info.is_published()
    except RuntimeError:
        return bool(getattr(info, "_published", False))


def _adapters(route: Route) -> dict[str, float]:
    return {route.adapter: 1.0} if route.adapter is not None else {}


# -- the command -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgegemma gateway",
        description="Answer MQTT readings with calibrated decisions (docs/gateway.md).",
    )
    p.add_argument("--broker", help="the MQTT broker, HOST:PORT (default port 1883)")
    p.add_argument(
        "--in",
        dest="topics",
        action="append",
        metavar="FILTER",
        help="a topic filter to answer (repeatable)",
    )
    p.add_argument("--out", help="the prefix of result topics (default: results)")
    p.add_argument("--skill", help="the shipped skill that answers --in's readings (sensor)")
    p.add_argument("--config", help="a TOML file with routes and settings (docs/gateway.md)")
    p.add_argument(
        "--client-id", help=f"the MQTT client id of the kept session (default {DEFAULT_CLIENT_ID})"
    )
    p.add_argument(
        "--model", help="the base model (a models.lock name or a path; default: the default model)"
    )
    p.add_argument("--backend", help="llamacpp (default), onnx or mediapipe")
    p.add_argument("--batch", type=int, help="readings answered together at most (default 8)")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log connections and refused readings"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .engine import load

    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    config = read_config(args)
    stop = threading.Event()
    # SIGTERM (systemd, docker stop) ends the loop after the batch in hand: its results are
    # published and its readings acknowledged; readings not yet taken stay with the broker.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with load(config.model, backend=config.backend, n_ctx=1024) as engine:
        gateway = Gateway(engine, config)
        routes = ", ".join(f"{r.topic} -> {config.out}/{r.topic}" for r in config.routes)
        gateway.run(
            stop,
            on_ready=lambda: print(
                f"edgegemma gateway: {config.host}:{config.port}, {routes}", flush=True
            ),
        )
    return 0
