"""The message the network sinks send, image payloads on a fake clock, secrets and headers."""

from __future__ import annotations

import base64
import json
import logging
import os

import cv2
import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.watch.clock import FakeClock
from musc_edge.watch.mqtt import MqttSink, MqttTls
from musc_edge.watch.outbound import (SCHEMA, ImagePayloads, jpeg_thumbnail, message_key, parse_header, read_secret,
                                      result_message)
from musc_edge.watch.webhook import WebhookSink

LINE = {"seq": 41, "path": "/data/cam1/p41.png", "arrival_time": "2026-11-24T08:01:12.304+00:00",
        "scoring_time": "2026-11-24T08:01:12.391+00:00", "image_score": 0.21, "raw_score": 0.85,
        "pool_size": 32, "verdict": "good", "heatmap": "/var/lib/musc/heatmaps/00000041_p41.png"}


def test_the_message_carries_seq_path_times_scores_and_verdict() -> None:
    msg = result_message(LINE, source="cam1")
    assert msg == {"schema": SCHEMA, "source": "cam1", "seq": 41, "path": "/data/cam1/p41.png",
                   "arrival_time": LINE["arrival_time"], "scoring_time": LINE["scoring_time"],
                   "image_score": 0.21, "raw_score": 0.85, "verdict": "good", "pool_size": 32}
    assert "heatmap" not in msg  # a path on the line PC means nothing to the consumer
    assert message_key(msg) == "cam1:41"
    bare = result_message({"seq": 3, "raw_score": 1.0})
    assert bare["verdict"] is None and message_key(bare) == "3"  # same schema without --threshold
    json.dumps(msg)  # serialisable as it is


def write_heatmap(path, h=300, w=900) -> None:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (0, 0, 255)
    ok, buf = cv2.imencode(".png", img)
    path.write_bytes(buf.tobytes())


def test_image_payloads_are_rate_limited_on_the_clock_and_stable_on_retry(tmp_path) -> None:
    clock = FakeClock()
    images = ImagePayloads(2.0, clock.monotonic, max_side=200)  # at most one per 0.5 s
    lines = []
    for seq in range(6):
        path = tmp_path / f"{seq}.png"
        write_heatmap(path)
        lines.append({"seq": seq, "heatmap": str(path)})
    got = []
    for line in lines:  # 4 results per second
        first = images.for_result(line)
        assert images.for_result(line) == first  # a retry of the same line: the same decision
        got.append(first is not None)
        clock.advance(0.25)
    assert got == [True, False, True, False, True, False]
    jpeg = images.for_result({"seq": 99, "heatmap": str(tmp_path / "0.png")}) or b""
    clock.advance(0.5)
    jpeg = images.for_result({"seq": 100, "heatmap": str(tmp_path / "0.png")})
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert jpeg[:2] == b"\xff\xd8" and max(decoded.shape[:2]) == 200  # JPEG, longer side capped
    msg = result_message({"seq": 100}, heatmap_jpeg=jpeg)
    assert base64.b64decode(msg["heatmap_jpeg"]) == jpeg


def test_no_image_without_a_heatmap_or_with_a_vanished_file(tmp_path) -> None:
    images = ImagePayloads(100.0, FakeClock().monotonic)
    assert images.for_result({"seq": 0}) is None
    assert images.for_result({"seq": 1, "heatmap": None}) is None
    assert images.for_result({"seq": 2, "heatmap": str(tmp_path / "gone.png")}) is None
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert jpeg_thumbnail(tmp_path / "junk.png", 100) is None


def test_image_payload_settings_are_checked() -> None:
    with pytest.raises(InputError, match="--rate-limit must be a positive"):
        ImagePayloads(0, FakeClock().monotonic)


def test_secrets_come_from_a_file_or_the_environment(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("MUSC_TEST_SECRET", "s3cret")
    assert read_secret(env="MUSC_TEST_SECRET") == "s3cret"
    assert read_secret(env="MUSC_TEST_UNSET_VAR") is None
    f = tmp_path / "pw"
    f.write_text("from-file\nignored\n")
    os.chmod(f, 0o600)
    assert read_secret(env="MUSC_TEST_SECRET", file=f) == "from-file"  # the file wins
    os.chmod(f, 0o644)
    with caplog.at_level(logging.WARNING):
        read_secret(file=f, what="MQTT password")
    assert "readable by other users" in caplog.text
    with pytest.raises(InputError, match="cannot be read"):
        read_secret(file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InputError, match="is empty"):
        read_secret(file=tmp_path / "empty")


def test_headers_parse_with_secrets_and_refuse_injection(tmp_path, monkeypatch) -> None:
    assert parse_header("X-Line: 3") == ("X-Line", "3")
    monkeypatch.setenv("MES_TOKEN", "Bearer abc")
    assert parse_header("Authorization: env:MES_TOKEN") == ("Authorization", "Bearer abc")
    (tmp_path / "tok").write_text("Bearer fromfile\n")
    assert parse_header(f"Authorization: file:{tmp_path / 'tok'}") == ("Authorization", "Bearer fromfile")
    for bad in ("no colon", "Bad Name: x", ": x"):
        with pytest.raises(InputError, match="Name: value"):
            parse_header(bad)
    with pytest.raises(InputError, match="not set"):
        parse_header("Authorization: env:MUSC_TEST_UNSET_VAR")
    with pytest.raises(InputError, match="line break"):
        parse_header("X-A: ok\r\nX-Injected: 1")


def test_sink_settings_are_checked_before_anything_connects(tmp_path) -> None:
    for topic in ("", "a/+/b", "a/#"):
        with pytest.raises(InputError, match="wildcards"):
            MqttSink("localhost", topic=topic)
    with pytest.raises(InputError, match="needs a username"):
        MqttSink("localhost", password="x")
    with pytest.raises(InputError, match="CA file not found"):
        MqttSink("localhost", tls=MqttTls(ca_file=tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(InputError, match="TLS files cannot be used"):
        MqttSink("localhost", tls=MqttTls(ca_file=tmp_path / "junk.pem"))
    with pytest.raises(InputError, match="protocol"):
        MqttSink("localhost", protocol="4")
    assert MqttSink("localhost", tls=MqttTls()).port == 8883  # the TLS port by default
    assert "secret" not in repr(MqttSink("localhost", username="u", password="secret"))
    for url in ("ftp://x/y", "http://", "localhost:8080/hook"):
        with pytest.raises(InputError, match="http:// or https://"):
            WebhookSink(url)
    with pytest.raises(InputError, match="holds credentials"):
        WebhookSink("https://user:pw@mes.local/hook")
    assert "tok" not in repr(WebhookSink("http://x/h", headers=[("Authorization", "tok")]))
