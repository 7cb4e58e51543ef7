"""What the network sinks send: the result message, optional heatmap bytes, secrets and headers.

:class:`musc_edge.watch.mqtt.MqttSink` and :class:`musc_edge.watch.webhook.WebhookSink` send the
same JSON message per result line (docs/line.md, "MQTT and webhook"), so a consumer written for
one reads the other. The message is built from the line of ``results.jsonl`` the dispatcher hands
the sink (docs/watch.md, "Sinks"), never from the daemon's memory: a repeat after a crash or an
outage carries the same ``seq`` and the same fields, which is what lets a consumer drop repeats.

Secrets (an MQTT password, a webhook's ``Authorization`` header, the live page's token) come from
an environment variable or a file, never from the command line, where ``ps`` and the shell history
show them to anyone on the box.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
from pathlib import Path

import cv2
import numpy as np

from musc_edge.core.errors import InputError

from .clock import Clock
from .live import file_of

log = logging.getLogger(__name__)

#: Names the message's layout; a consumer can refuse a layout it does not know.
SCHEMA = "musc-edge.result/1"

#: Fields of a result line (docs/watch.md, "results.jsonl") copied into the message, in this order,
#: where the line has them (``path_bytes_b64``: the exact bytes of a name that is not UTF-8).
#: Local-only fields (the heatmap's path on the line PC) stay out.
FIELDS = ("seq", "path", "path_bytes_b64", "sha256", "arrival_time", "scoring_time", "image_score", "raw_score",
          "normalised_score", "verdict", "pool_size")


def result_message(result: dict, *, source: str | None = None, heatmap_jpeg: bytes | None = None) -> dict:
    """The JSON object sent for one result line.

    ``seq`` is the key: it is unique and increasing per OUTDIR, so a consumer keeps the highest seq
    it has stored (per ``source`` when several cameras share a topic or an endpoint) and drops any
    message at or below it. ``verdict`` is always present (null without a threshold), so the
    consumer's schema does not depend on the daemon's flags.
    """
    msg: dict = {"schema": SCHEMA}
    if source is not None:
        msg["source"] = source
    for key in FIELDS:
        if key in result:
            msg[key] = result[key]
    msg["seq"] = int(result["seq"])
    msg.setdefault("verdict", None)
    if heatmap_jpeg is not None:
        msg["heatmap_jpeg"] = base64.b64encode(heatmap_jpeg).decode("ascii")
    return msg


def message_key(msg: dict) -> str:
    """``source:seq`` (or ``seq``): the idempotency key sent beside the message (MQTT user property,
    HTTP ``Idempotency-Key``), for consumers that dedupe on metadata rather than the body."""
    return f"{msg['source']}:{msg['seq']}" if "source" in msg else str(msg["seq"])


# ----------------------------------------------------------------------------------------- images
class ImagePayloads:
    """Heatmap overlays as JPEG bytes, at most ``rate_hz`` per second (per sink).

    An image costs far more than the message (tens of kB against a few hundred bytes), and a line
    at 10 parts/s can fill a PLC gateway's link; the rate limit keeps the messages themselves at
    full rate and attaches an image only when ``1 / rate_hz`` seconds have passed since the last
    one. The decision is remembered per seq, so a retry after an outage sends what the first try
    would have sent. Needs ``--heatmaps`` (the daemon writes the overlay the result names); a
    result without one, or whose file is gone, goes without an image.
    """

    def __init__(self, rate_hz: float, clock: Clock, *, max_side: int = 640, quality: int = 80) -> None:
        if not rate_hz > 0:
            raise InputError(f"--rate-limit must be a positive number of images per second, got {rate_hz}")
        if not 1 <= quality <= 100 or max_side < 16:
            raise InputError(f"JPEG quality must be 1..100 and max_side >= 16, got {quality}, {max_side}")
        self.interval_s = 1.0 / float(rate_hz)
        self.clock = clock
        self.max_side, self.quality = int(max_side), int(quality)
        self._last_sent: float | None = None
        self._decided: tuple[int, bytes | None] | None = None  # (seq, image) of the line being delivered

    def for_result(self, result: dict) -> bytes | None:
        seq = int(result["seq"])
        if self._decided is not None and self._decided[0] == seq:
            return self._decided[1]
        image = None
        now = self.clock()
        heatmap = file_of(result, "heatmap")
        if heatmap is not None and (self._last_sent is None or now - self._last_sent >= self.interval_s):
            image = jpeg_thumbnail(Path(heatmap), self.max_side, self.quality)
            if image is not None:
                self._last_sent = now
        self._decided = (seq, image)
        return image


def jpeg_thumbnail(path: Path, max_side: int, quality: int = 80) -> bytes | None:
    """The image at ``path`` as JPEG, its longer side at most ``max_side``; None if unreadable."""
    try:
        data = path.read_bytes()
    except OSError as e:
        log.debug("no image from %s: %s", path, e)
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes() if ok else None


# ----------------------------------------------------------------------------------------- secrets
def read_secret(*, env: str | None = None, file: Path | str | None = None, what: str = "secret") -> str | None:
    """A secret from ``file`` (first line, stripped) or else the environment variable ``env``.

    A file readable by group or others is used but warned about: a password in a world-readable
    file is as good as on the command line.
    """
    if file is not None:
        path = Path(file)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"{what} file {path} cannot be read ({e.strerror or e}); fix the path or its "
                             "permissions") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s file %s is readable by other users; chmod 600 it", what, path)
        value = text.splitlines()[0].strip() if text.strip() else ""
        if not value:
            raise InputError(f"{what} file {path} is empty")
        return value
    if env is not None:
        value = os.environ.get(env)
        return value if value else None
    return None


#: RFC 9110 field-name: a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` -> (name, value); ``value`` may be ``env:VAR`` or ``file:PATH`` for secrets.

    So ``--webhook-header 'Authorization: env:MES_TOKEN'`` keeps the token out of ``ps``. Line
    breaks in a value are refused: they would let a value add headers of its own.
    """
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _HEADER_NAME.fullmatch(name):
        raise InputError(f"expected a header as 'Name: value' (e.g. 'X-Line: 3'), but got {text!r}")
    if value.startswith("env:"):
        var = value[4:]
        secret = read_secret(env=var, what=f"header {name}")
        if secret is None:
            raise InputError(f"header {name} reads the environment variable {var}, which is not set")
        value = secret
    elif value.startswith("file:"):
        value = read_secret(file=value[5:], what=f"header {name}") or ""
    if any(c in value for c in "\r\n\0"):
        raise InputError(f"header {name}: the value holds a line break or NUL; give it on one line")
    return name, value
