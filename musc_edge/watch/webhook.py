"""Webhook output: an HTTP POST of the result message per line, to an MES or any HTTP service.

A sink behind :class:`musc_edge.watch.sinks.Sink` (docs/watch.md, "Sinks"). :meth:`WebhookSink.emit`
returns only after the endpoint answered 2xx, so the seq the dispatcher then saves means "the
endpoint accepted it"; anything else raises and the dispatcher retries the same line with its
backoff (there is no retry loop here: one place decides when to try again). What counts as a
failure: no connection, a timeout, and every status outside 200-299, redirects included: urllib
would follow a 301/302 of a POST as a GET without the body, and the 200 of that GET would mark a
message delivered that never was.

The body is :func:`musc_edge.watch.outbound.result_message`; ``Idempotency-Key`` (``source:seq``)
and ``X-Musc-Edge-Seq`` carry the key, so an endpoint can drop a repeat without parsing the body.
Standard library only (urllib): nothing to install on the line PC.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterable

from musc_edge import __version__
from musc_edge.core.errors import InputError

from .outbound import ImagePayloads, message_key, result_message

log = logging.getLogger(__name__)

#: Bytes of an error response kept for the log line (the rest is read and dropped).
_BODY_IN_ERROR = 200


class WebhookError(ConnectionError):
    """The endpoint answered, but not with 2xx."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ARG002, PLR0913
        return None  # urllib then raises HTTPError for the 3xx: a failure, retried


class WebhookSink:
    """POSTs each result as JSON to ``url``; ``headers`` are added to every request."""

    def __init__(self, url: str, *, name: str = "webhook", headers: Iterable[tuple[str, str]] = (),
                 timeout_s: float = 10.0, images: ImagePayloads | None = None, source: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--webhook expects an http:// or https:// URL with a host, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise InputError("--webhook URL holds credentials, which `ps` shows to anyone on the box: pass them "
                             "as a header read from the environment, --webhook-header 'Authorization: env:VAR'")
        if not timeout_s > 0:
            raise InputError(f"webhook timeout must be > 0 s, got {timeout_s}")
        self.name, self.url, self.timeout_s = name, url, float(timeout_s)
        self.headers = dict(headers)
        self.images, self.source = images, source
        handlers: list = [_NoRedirects()]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:  # never the header values (tokens)
        return f"WebhookSink({self.url}, headers={sorted(self.headers)}, name={self.name!r})"

    def emit(self, result: dict) -> None:
        image = self.images.for_result(result) if self.images is not None else None
        msg = result_message(result, source=self.source, heatmap_jpeg=image)
        headers = {"User-Agent": f"musc-edge/{__version__}", **self.headers,
                   "Content-Type": "application/json", "Idempotency-Key": message_key(msg),
                   "X-Musc-Edge-Seq": str(msg["seq"])}
        request = urllib.request.Request(self.url, data=json.dumps(msg).encode(), headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                status = response.status
                response.read()  # the whole answer: the connection is then free for the next POST
        except urllib.error.HTTPError as e:
            body = _excerpt(e)
            raise WebhookError(f"{self.url} answered HTTP {e.code} {e.reason} to seq {msg['seq']}"
                               f"{': ' + body if body else ''}") from None
        except urllib.error.URLError as e:  # refused, DNS, TLS
            raise ConnectionError(f"cannot POST to {self.url}: {e.reason}") from None
        if not 200 <= status < 300:  # 1xx end up here; urllib raises for the rest
            raise WebhookError(f"{self.url} answered HTTP {status} to seq {msg['seq']}")

    def close(self) -> None:
        pass


def _excerpt(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read(_BODY_IN_ERROR).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - only for the log line
        return ""
    finally:
        error.close()
    return " ".join(text.split())
