"""MQTT output: one QoS 1 message per result line, for a PLC gateway, an MES or a dashboard.

A sink behind :class:`musc_edge.watch.sinks.Sink` (docs/watch.md, "Sinks"): the dispatcher hands
it the lines of ``results.jsonl`` in seq order and saves the seq after :meth:`MqttSink.emit`
returns. So ``emit`` returns only once the broker has acknowledged the message (PUBACK, QoS 1):
the saved seq then means "the broker has it", and a failure anywhere before that (no connection,
a refused login, a broker that dies with the message in flight, no ack within ``timeout_s``)
raises, and the dispatcher retries the same line with backoff. Delivery is at least once: a
message the broker stored but whose ack was lost is sent again, with the same ``seq``.

After any failure the client is dropped and a fresh one connects at the next try, with a clean
session: paho's own queue of unacknowledged messages goes with it, so the only resend is the
dispatcher's, from results.jsonl, in order (a second queue that replays old messages after a
reconnect could interleave them with newer ones).

Credentials never come from the command line (docs/line.md, "Secrets"): pass ``password`` read by
:func:`musc_edge.watch.outbound.read_secret` from a file or the environment.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from musc_edge.core.errors import InputError

from .outbound import ImagePayloads, message_key, result_message

log = logging.getLogger(__name__)

PROTOCOLS = ("3.1.1", "5")


@dataclass(frozen=True)
class MqttTls:
    """TLS to the broker. ``ca_file`` None: the system's CAs; ``cert_file``/``key_file``: a client
    certificate; ``insecure``: skip the broker's host name check (a lab broker with a self-signed
    certificate; the chain is still checked against ``ca_file``)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        """The TLS context, built once at start: a bad file is a user error now, not an outage later."""
        for what, path in (("CA", self.ca_file), ("client certificate", self.cert_file), ("client key", self.key_file)):
            if path is not None and not Path(path).is_file():
                raise InputError(f"MQTT TLS {what} file not found: {path}")
        if self.key_file is not None and self.cert_file is None:
            raise InputError("an MQTT TLS client key needs its certificate (--mqtt-cert) too")
        try:
            ctx = ssl.create_default_context(cafile=_str(self.ca_file))
            if self.cert_file is not None:
                ctx.load_cert_chain(str(self.cert_file), _str(self.key_file))
        except (ssl.SSLError, OSError) as e:
            raise InputError(f"MQTT TLS files cannot be used ({e}); give PEM files: --mqtt-ca, --mqtt-cert, "
                             "--mqtt-key") from None
        ctx.check_hostname = not self.insecure
        return ctx


class MqttSink:
    """Publishes each result to ``topic`` with QoS 1 and waits for the broker's ack."""

    def __init__(self, host: str, port: int | None = None, topic: str = "musc-edge/results", *,
                 name: str = "mqtt", client_id: str | None = None, username: str | None = None,
                 password: str | None = None, tls: MqttTls | None = None, protocol: str = "3.1.1",
                 keepalive_s: int = 30, timeout_s: float = 10.0, images: ImagePayloads | None = None,
                 source: str | None = None) -> None:
        try:
            import paho.mqtt.client  # noqa: F401 - checked here: a missing extra is a user error (exit 2)
        except ImportError:
            raise InputError("the MQTT sink needs paho-mqtt: pip install 'musc-edge[line]'") from None
        if not host:
            raise InputError("--mqtt needs a broker host, e.g. --mqtt broker.local:1883")
        _check_topic(topic)
        if protocol not in PROTOCOLS:
            raise InputError(f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if password is not None and username is None:
            raise InputError("an MQTT password needs a username (--mqtt-username)")
        self._ssl = tls.context() if tls is not None else None
        if not timeout_s > 0 or keepalive_s < 5:
            raise InputError(f"MQTT timeout must be > 0 s and keepalive >= 5 s, got {timeout_s}, {keepalive_s}")
        self.name = name
        self.host, self.port = host, int(port if port is not None else (8883 if tls is not None else 1883))
        self.topic, self.protocol = topic, protocol
        # <= 23 characters: the longest client id an MQTT 3.1.1 broker must accept
        self.client_id = client_id or f"musc-edge-{uuid.uuid4().hex[:12]}"
        self.username, self._password = username, password
        self.tls, self.keepalive_s, self.timeout_s = tls, int(keepalive_s), float(timeout_s)
        self.images, self.source = images, source
        self._conn: _Connection | None = None

    def __repr__(self) -> str:  # never the password
        return f"MqttSink({self.host}:{self.port}, topic={self.topic!r}, name={self.name!r})"

    # ------------------------------------------------------------------------------------ Sink
    def emit(self, result: dict) -> None:
        from paho.mqtt.client import MQTT_ERR_SUCCESS, error_string

        image = self.images.for_result(result) if self.images is not None else None
        msg = result_message(result, source=self.source, heatmap_jpeg=image)
        conn = self._connection()
        info = conn.client.publish(self.topic, json.dumps(msg).encode(), qos=1,
                                   properties=self._properties(msg))
        if info.rc != MQTT_ERR_SUCCESS:
            self._drop()
            raise ConnectionError(f"MQTT publish to {self.host}:{self.port} failed: {error_string(info.rc)}")
        deadline = time.monotonic() + self.timeout_s
        while not info.is_published():
            if conn.lost.is_set():
                self._drop()
                raise ConnectionError(f"MQTT broker {self.host}:{self.port} went away before it acknowledged seq "
                                      f"{msg['seq']} ({conn.reason})")
            if time.monotonic() > deadline:
                self._drop()
                raise TimeoutError(f"MQTT broker {self.host}:{self.port} did not acknowledge seq {msg['seq']} "
                                   f"within {self.timeout_s:g} s")
            conn.acked.wait(0.05)
            conn.acked.clear()
        refused = conn.rejected.pop(info.mid, None)
        if refused is not None:  # MQTT 5: a PUBACK with a failure reason (e.g. the broker's ACL)
            raise PermissionError(f"MQTT broker {self.host}:{self.port} rejected seq {msg['seq']} on topic "
                                  f"{self.topic!r}: {refused}")

    def close(self) -> None:
        self._drop()

    # ------------------------------------------------------------------------------------ connection
    def _properties(self, msg: dict):
        if self.protocol != "5":
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("seq", str(msg["seq"])), ("key", message_key(msg))]
        props.ContentType = "application/json"
        return props

    def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.lost.is_set():
            return self._conn
        self._drop()
        self._conn = self._connect()
        return self._conn

    def _connect(self) -> _Connection:
        import paho.mqtt.client as mqtt

        v5 = self.protocol == "5"
        conn = _Connection()
        kwargs = {} if v5 else {"clean_session": True}
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, **kwargs)
        conn.client = client
        client.connect_timeout = self.timeout_s
        if self.username is not None:
            client.username_pw_set(self.username, self._password)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
            client.tls_insecure_set(self.tls.insecure)
        client.on_connect = conn.on_connect
        client.on_disconnect = conn.on_disconnect
        client.on_publish = conn.on_publish
        try:
            client.connect(self.host, self.port, self.keepalive_s,
                           clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        except OSError as e:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError is an OSError)
            raise ConnectionError(f"cannot connect to MQTT broker {self.host}:{self.port}: {e}") from None
        conn.start()
        if not conn.connected.wait(self.timeout_s) and not conn.lost.is_set():
            conn.stop()
            raise TimeoutError(f"MQTT broker {self.host}:{self.port} did not answer the connect within "
                               f"{self.timeout_s:g} s")
        if conn.refused is not None or conn.lost.is_set():
            conn.stop()
            why = conn.refused or conn.reason
            hint = "; check the username and password" if "authori" in why.lower() or "password" in why.lower() else ""
            raise ConnectionError(f"MQTT broker {self.host}:{self.port} refused the connection: {why}{hint}")
        log.info("connected to MQTT broker %s:%d as %s (topic %s)", self.host, self.port, self.client_id, self.topic)
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.stop()
            self._conn = None


class _Connection:
    """One paho client, its network thread and the events that thread sets (a new one per
    connection, so a late callback of a dropped client cannot touch the next).

    The thread runs ``client.loop()`` until the connection ends and then stops: no reconnect of
    its own (paho's ``loop_start`` would reconnect and replay its queue; here a reconnect is the
    next ``emit``, from results.jsonl), and a stop takes one loop step, not a reconnect delay.
    """

    def __init__(self) -> None:
        self.client = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.connected, self.lost, self.acked = threading.Event(), threading.Event(), threading.Event()
        self.refused: str | None = None
        self.rejected: dict[int, str] = {}  # mid -> failure reason of its PUBACK (MQTT 5 only)
        self.reason = "connection lost"

    def on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ARG002
        if reason_code.is_failure:
            self.refused = str(reason_code)
            self.lost.set()
        self.connected.set()

    def on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ARG002
        self.reason = f"disconnected: {reason_code}"
        self.lost.set()
        self.connected.set()  # wake a connect that is waiting

    def on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ARG002
        if getattr(reason_code, "is_failure", False):
            self.rejected[mid] = str(reason_code)
        self.acked.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-net", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from paho.mqtt.client import MQTT_ERR_SUCCESS, error_string

        client = self.client
        while not self._stopping.is_set():
            rc = client.loop(timeout=0.05)
            if rc != MQTT_ERR_SUCCESS:
                if not self.lost.is_set():
                    self.reason = f"connection lost: {error_string(rc)}"
                break
        self.lost.set()
        self.connected.set()

    def stop(self) -> None:
        client = self.client
        if client is None:
            return
        self.lost.set()
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self.client = None


def _check_topic(topic: str) -> None:
    """MQTT 3.1.1 section 4.7: a topic to publish to has no wildcards, no NUL, 1..65535 bytes."""
    if not topic or len(topic.encode()) > 65535 or any(c in topic for c in "+#\0"):
        raise InputError(f"--mqtt-topic {topic!r} cannot be published to: give a non-empty topic without "
                         "the wildcards + and # (e.g. factory/line3/musc)")


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
