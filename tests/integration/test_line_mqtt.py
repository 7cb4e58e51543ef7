"""MqttSink against a real Mosquitto broker that the tests start on a free loopback port.

Skipped, with the reason, where ``mosquitto`` (Debian: ``apt-get install mosquitto``) or
paho-mqtt is missing. The dispatcher runs its real threads (docs/watch.md, "Sinks"); the
subscriber is a second paho client with a persistent session, as a consumer on a line would be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import subprocess
import threading
import time
from pathlib import Path

import pytest

from musc_edge.watch.journal import append_durably
from musc_edge.watch.outbound import read_secret
from musc_edge.watch.sinks import Backoff, Dispatcher, SeqFile

sys.path.insert(0, str(Path(__file__).parent))
from watch_helpers import first_occurrences, wait_for  # noqa: E402

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed: pip install 'musc-edge[line]'")

from musc_edge.watch.mqtt import MqttSink, MqttTls  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary: apt-get install -y mosquitto "
                                                          "(.ci/run does this when run as root)")
TOPIC = "factory/line3/musc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto process with its own config, persistence and log under ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, extra: str = "") -> None:
        self.folder, self.port = folder, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"
        # as root, mosquitto would switch to the user 'mosquitto', who cannot write here
        root = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{root}listener {self.port} 127.0.0.1\npersistence true\n"
                             f"persistence_location {folder}/\nlog_dest file {self.log}\n"
                             f"log_type error\nlog_type warning\nlog_type notice\n{extra}")
        if "allow_anonymous" not in extra:
            with open(self.conf, "a") as f:
                f.write("allow_anonymous true\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()[-500:]} {self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file, as a service stop does
            self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else ""


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


class Subscriber:
    """A consumer with a persistent session (clean_session False, QoS 1): the broker keeps its
    messages while it is disconnected, also across a broker restart (persistence)."""

    def __init__(self, port: int, topic: str = TOPIC, protocol: str = "3.1.1", **auth) -> None:
        self.messages: list[dict] = []
        self.props: list = []
        self._lock = threading.Lock()
        if protocol == "5":  # a plain session: this one is only there to read the PUBLISH properties
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="line-consumer-5",
                                      protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="line-consumer",
                                      clean_session=False)
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        self.client.reconnect_delay_set(0.05, 0.3)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(topic, qos=1), None)[1]
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 5)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber got no SUBACK"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append(json.loads(msg.payload))
            self.props.append(getattr(msg, "properties", None))

    def seqs(self) -> list[int]:
        with self._lock:
            return [m["seq"] for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def add_results(out: Path, seqs) -> None:
    append_durably(out / "results.jsonl", (json.dumps({"seq": s, "path": f"/in/p{s}.png", "raw_score": 1 + s / 1000,
                                                       "image_score": 0.5, "verdict": "good",
                                                       "scoring_time": "2026-11-24T08:00:00.000+00:00"})
                                          for s in seqs))


def dispatcher(out: Path, sink) -> Dispatcher:
    return Dispatcher([sink], out / "results.jsonl", out / "state", backoff=Backoff(0.05, 0.4), idle_s=0.1)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_one_message_per_result_with_the_seq_key(broker, tmp_path, protocol) -> None:
    sub = Subscriber(broker.port, protocol=protocol)
    out = tmp_path / "out"
    out.mkdir()
    sink = MqttSink("127.0.0.1", broker.port, TOPIC, protocol=protocol, timeout_s=5, source="cam1")
    d = dispatcher(out, sink)
    add_results(out, range(10))
    d.start()
    try:
        add_results(out, range(10, 25))
        d.notify()
        wait_for(lambda: len(sub.seqs()) >= 25, 20, "25 messages")
        time.sleep(0.3)  # nothing more comes
    finally:
        d.close()
        sub.close()
    assert sub.seqs() == list(range(25))  # one per result, in order: no outage, no repeat
    m = sub.messages[7]
    assert (m["seq"], m["source"], m["path"], m["verdict"], m["raw_score"]) == (7, "cam1", "/in/p7.png", "good", 1.007)
    assert SeqFile(out / "state" / "sinks" / "mqtt.seq").load() == 24  # saved after the broker's ack
    if protocol == "5":
        assert dict(sub.props[7].UserProperty) == {"seq": "7", "key": "cam1:7"}


def test_broker_stopped_mid_stream_and_restarted_loses_nothing(tmp_path, caplog) -> None:
    """Every seq arrives at least once, in order, none missing; the producer never waits."""
    caplog.set_level(logging.WARNING, logger="musc_edge.watch.sinks")
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker.port)
    out = tmp_path / "out"
    out.mkdir()
    sink = MqttSink("127.0.0.1", broker.port, TOPIC, timeout_s=1.0)
    d = dispatcher(out, sink)
    d.start()
    total, stop_at, restart_at = 120, 40, 80
    append_s = []
    try:
        for seq in range(total):
            t0 = time.monotonic()
            add_results(out, [seq])
            d.notify()
            append_s.append(time.monotonic() - t0)
            if seq == stop_at:
                wait_for(lambda: len(sub.seqs()) > 10, 10, "a first part of the stream")
                broker.stop()
            if seq == restart_at:
                broker.start()
            time.sleep(0.02)
        wait_for(lambda: set(sub.seqs()) >= set(range(total)), 40, f"all {total} seqs after the restart")
    finally:
        d.close()
        sub.close()
        broker.stop()
    got = sub.seqs()
    assert first_occurrences(got) == list(range(total)), got  # in order, none missing
    assert max(append_s) < 0.5  # the producer (results.jsonl + notify) did not wait on the dead broker
    assert SeqFile(out / "state" / "sinks" / "mqtt.seq").load() == total - 1
    logged = caplog.text
    assert "sink mqtt failed after seq" in logged and "sink mqtt recovered after" in logged  # there was an outage


def test_a_broker_that_is_down_fails_fast_and_the_next_try_delivers(tmp_path) -> None:
    port = free_port()
    sink = MqttSink("127.0.0.1", port, TOPIC, timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot connect to MQTT broker 127.0.0.1:{port}"):
        sink.emit({"seq": 0, "raw_score": 1.0})
    assert time.monotonic() - t0 < 2.5
    broker = Broker(tmp_path / "b", port=port).start()
    try:
        sub = Subscriber(port)
        sink.emit({"seq": 0, "raw_score": 1.0})
        wait_for(lambda: sub.seqs() == [0], 10, "seq 0")
        sub.close()
    finally:
        sink.close()
        broker.stop()


def test_username_and_password_from_a_file(tmp_path, monkeypatch) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("no mosquitto_passwd (Debian's mosquitto package has it)")
    pw_file = tmp_path / "passwd"
    subprocess.run([passwd, "-b", "-c", str(pw_file), "line3", "correct horse"], check=True, capture_output=True)
    os.chmod(pw_file, 0o644)  # mosquitto reads it after dropping privileges in some setups
    broker = Broker(tmp_path / "broker", extra=f"allow_anonymous false\npassword_file {pw_file}\n").start()
    secret = tmp_path / "mqtt_password"
    secret.write_text("correct horse\n")
    os.chmod(secret, 0o600)
    try:
        wrong = MqttSink("127.0.0.1", broker.port, TOPIC, username="line3", password="wrong", timeout_s=3)
        with pytest.raises(ConnectionError, match="refused the connection: Not authorized.*username and password"):
            wrong.emit({"seq": 0})
        anonymous = MqttSink("127.0.0.1", broker.port, TOPIC, timeout_s=3)
        with pytest.raises(ConnectionError, match="refused"):
            anonymous.emit({"seq": 0})
        sub = Subscriber(broker.port, username="line3", password="correct horse")
        ok = MqttSink("127.0.0.1", broker.port, TOPIC, username="line3",
                      password=read_secret(file=secret, env="MUSC_EDGE_MQTT_PASSWORD"), timeout_s=3)
        ok.emit({"seq": 0})
        wait_for(lambda: sub.seqs() == [0], 10, "seq 0")
        ok.close()
        sub.close()
    finally:
        broker.stop()


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (SAN), made with the openssl command."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=musc-edge test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    for p in (key, cert, ca):
        os.chmod(p, 0o644)
    return ca, cert, key


def test_tls_with_the_brokers_ca(tmp_path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test CA")
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = make_certs(certs)
    broker = Broker(tmp_path / "broker", extra=f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n").start()
    try:
        sink = MqttSink("127.0.0.1", broker.port, TOPIC, tls=MqttTls(ca_file=ca), timeout_s=5)
        sink.emit({"seq": 5, "raw_score": 1.0})  # the ack came back over TLS
        sink.close()
        untrusted = MqttSink("127.0.0.1", broker.port, TOPIC, tls=MqttTls(), timeout_s=5)  # system CAs only
        with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            untrusted.emit({"seq": 6})
        plain = MqttSink("127.0.0.1", broker.port, TOPIC, timeout_s=2)  # no TLS against a TLS listener
        with pytest.raises((ConnectionError, TimeoutError)):
            plain.emit({"seq": 7})
        plain.close()
    finally:
        broker.stop()
