"""The live page, its JSON API and /metrics: a read-only HTTP server beside the watch daemon.

Standard library only (``http.server.ThreadingHTTPServer``), plus prometheus-client for
``/metrics``. Routes (docs/line.md, "Live page and metrics"):

| route | what |
|---|---|
| ``/`` | the page; its script and style under ``/static/`` (served by us: no CDN, no build step) |
| ``/api/results?after=SEQ&limit=N`` | results.jsonl lines with seq > SEQ, at most N (1..1000) |
| ``/api/status`` | counts, latencies, the pool, model and device (:class:`LiveStatus` + results) |
| ``/healthz``, ``/readyz`` | alive; ready = model loaded and pool at its minimum (503 until then) |
| ``/metrics`` | Prometheus text format (:mod:`musc_edge.watch.metrics`) |
| ``/image/SEQ``, ``/heatmap/SEQ`` | the scored image / its overlay, by sequence number; ``?thumb=1`` a small JPEG |

Security, because the page shows production images and may face a plant network:

- read-only: GET and HEAD; anything else is 405;
- files are found by seq only: the path comes from results.jsonl (written by the daemon), never
  from the request; static files are a fixed table of names;
- binding to a non-loopback address needs a token (:func:`check_bind`), refused before any
  socket is opened; a token, when set, is checked on every request (``Authorization: Bearer``,
  the cookie the page sets, or ``?token=``) in constant time;
- without a token (a loopback bind), only requests whose Host is a loopback name are answered:
  a DNS-rebinding page cannot read the results through a browser on the line PC;
- query strings are parsed strictly (known names, one value each, bounded integers), anything
  else is 400; long request lines are 414; a handler error is a 500 for that request only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from musc_edge.core.errors import InputError

from .live import LiveStatus, ResultsLog, file_of
from .outbound import jpeg_thumbnail

log = logging.getLogger(__name__)

#: Longest path + query we answer (the page's own URLs are far shorter); beyond: 414.
MAX_TARGET = 1024
#: Most results one /api/results call returns.
MAX_LIMIT = 1000
#: Largest seq a route accepts (digits): beyond any real line, well inside int64.
_SEQ = re.compile(r"[0-9]{1,15}")
_IMAGE_ROUTE = re.compile(r"/(image|heatmap)/([^/]*)")
#: Shortest token for a non-loopback bind: guessing 16 random characters is out of reach.
MIN_TOKEN = 16
#: Longest side of ``?thumb=1`` images (the page's tiles).
THUMB_SIDE = 320
COOKIE = "musc_edge_token"

_STATIC = {"live.js": "text/javascript; charset=utf-8", "live.css": "text/css; charset=utf-8",
           "favicon.svg": "image/svg+xml"}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ----------------------------------------------------------------------------------------- binding
def parse_bind(text: str) -> tuple[str, int]:
    """``--http [HOST:]PORT`` -> (host, port); host 127.0.0.1 by default, ``[::1]:8080`` for IPv6."""
    text = text.strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise InputError(f"--http expects [HOST:]PORT, e.g. 8080, 0.0.0.0:8080 or [::1]:8080, got {text!r}")
        host, port_text = text[1:end], text[end + 2:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise InputError(f"--http expects [HOST:]PORT with a port 0..65535, e.g. 8080 or 0.0.0.0:8080, got {text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; every other name or address counts as the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a (long enough) token, with one line saying why."""
    if token is not None and len(token) < MIN_TOKEN:
        raise InputError(f"--http-token is {len(token)} characters; use at least {MIN_TOKEN} random ones, e.g. "
                         "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if not is_loopback(host) and token is None:
        raise InputError(f"--http {host} is reachable from the network and would show production images to "
                         "anyone: give --http-token-file FILE (or MUSC_EDGE_HTTP_TOKEN), or bind 127.0.0.1")


# ----------------------------------------------------------------------------------------- server
class LiveServer:
    """The read-only server over ``results_path`` and ``status``; :meth:`start` serves in a thread.

    ``port`` 0 picks a free port (see :attr:`url`). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, results_path: Path | str, status: LiveStatus, *, host: str = "127.0.0.1",
                 port: int = 8080, token: str | None = None, page_results: int = 300) -> None:
        check_bind(host, token)  # before any socket: a refused start binds nothing
        try:
            from . import metrics
        except ImportError:
            raise InputError("--http needs prometheus-client for /metrics: pip install 'musc-edge[line]'") from None
        self.results = ResultsLog(results_path)
        self.status = status
        self.token = token.encode() if token is not None else None
        self.page_results = int(page_results)
        self._metrics = metrics
        self._registry = metrics.registry_for(self.results, status)
        self._static = {name: resources.files(__package__).joinpath("static", name).read_bytes()
                        for name in (*_STATIC, "live.html")}
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        server_cls = _Server6 if ":" in host else _Server
        try:
            self._server = server_cls((host, port), _Handler)
        except OSError as e:
            raise InputError(f"--http {host}:{port}: cannot listen there ({e.strerror or e}); "
                             "pick another port") from None
        self._server.app = self
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> LiveServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="live-http", daemon=True)
        self._thread.start()
        log.info("live page on %s%s", self.url, " (token required)" if self.token else "")
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ data
    def status_json(self) -> dict:
        self.results.refresh()
        r, s = self.results.snapshot(), self.status.snapshot()
        latency = {k: v.percentiles() for k, v in s.pop("latency").items()}
        latency["end_to_end"] = r.end_to_end.percentiles()
        return {**s, "counts": {"scored": r.scored, "anomalous": r.anomalous, "skipped": s["skipped"]},
                "latency_s": latency, "first_seq": r.first_seq, "last_seq": r.last_seq, "last": r.last,
                "uptime_s": max(0.0, time.time() - s["started_at"]), "page_results": self.page_results}

    def metrics_text(self) -> bytes:
        self.results.refresh()
        return self._metrics.render(self._registry)

    def image(self, kind: str, seq: int, thumb: bool) -> tuple[bytes, str] | None:
        """The image (or overlay) of result ``seq``: its path is read from results.jsonl."""
        self.results.refresh()
        result = self.results.get(seq)
        if result is None:
            return None
        name = file_of(result, "path" if kind == "image" else "heatmap")
        if name is None:
            return None
        path = Path(name)
        if thumb:
            with self._thumb_lock:
                cached = self._thumbs.get((kind, seq))
                if cached is not None:
                    self._thumbs.move_to_end((kind, seq))
                    return cached, "image/jpeg"
            data = jpeg_thumbnail(path, THUMB_SIDE, 80)
            if data is None:
                return None
            with self._thumb_lock:
                self._thumbs[(kind, seq)] = data
                while len(self._thumbs) > 256:
                    self._thumbs.popitem(last=False)
            return data, "image/jpeg"
        try:
            if not path.is_file():
                return None
            data = path.read_bytes()
        except OSError:
            return None
        ctype = _IMAGE_TYPES.get(path.suffix.lower())
        if ctype is None:  # TIFF and the like: browsers cannot show them
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            ok, buf = cv2.imencode(".png", image) if image is not None else (False, None)
            if not ok:
                return None
            data, ctype = buf.tobytes(), "image/png"
        return data, ctype


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds up a stop
    request_queue_size = 64
    app: LiveServer

    def handle_error(self, request, client_address) -> None:  # noqa: ARG002 - not socketserver's stderr dump
        log.warning("live page: error with a request from %s", client_address[0], exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


# ----------------------------------------------------------------------------------------- requests
class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "musc-edge"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 15  # seconds a client may take to send its request (slow clients do not pile up)

    # ------------------------------------------------------------------------------------ methods
    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(head=True)

    def _refuse_method(self) -> None:
        self.close_connection = True  # its body is never read: it must not be parsed as the next request
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                   {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    # ------------------------------------------------------------------------------------ routing
    def _handle(self, head: bool) -> None:
        self._head, self._cookie = head, None
        app = self.server.app
        try:
            if len(self.path) > MAX_TARGET:
                raise _BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG, f"request target over {MAX_TARGET} bytes")
            if app.token is None and not _local_host(self.headers.get("Host", "")):
                # DNS rebinding: a web page elsewhere makes a browser on the line PC send it here
                # under its own name; without a token only loopback names may ask
                raise _BadRequest(HTTPStatus.FORBIDDEN, "this server answers requests for 127.0.0.1 / localhost only")
            parts = urllib.parse.urlsplit(self.path)
            path = parts.path
            query = _parse_query(parts.query)
            if not self._authorized(app, query):
                self._send(HTTPStatus.UNAUTHORIZED, b"token required\n", "text/plain; charset=utf-8",
                           {"WWW-Authenticate": 'Bearer realm="musc-edge"'})
                return
            query.pop("token", None)
            self._route(app, path, query)
        except _BadRequest as e:
            self._send(e.status, (str(e) + "\n").encode(), "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception:  # noqa: BLE001 - one request fails, the server goes on
            log.exception("live page: error answering %s", self.path.split("?")[0])
            try:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain; charset=utf-8")
            except OSError:
                pass

    def _route(self, app: LiveServer, path: str, query: dict[str, str]) -> None:
        if path == "/":
            _only(query, ())
            self._send(HTTPStatus.OK, app._static["live.html"], "text/html; charset=utf-8")
        elif path.startswith("/static/"):
            _only(query, ())
            name = path[len("/static/"):]
            if name not in _STATIC:
                raise _BadRequest(HTTPStatus.NOT_FOUND, "no such file")
            self._send(HTTPStatus.OK, app._static[name], _STATIC[name], {"Cache-Control": "max-age=300"})
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif path == "/healthz":
            _only(query, ())
            self._json({"status": "alive"})
        elif path == "/readyz":
            _only(query, ())
            s = app.status.snapshot()
            if s["ready"]:
                self._json({"status": "ready"})
            else:
                why = "model not loaded" if not s["model_loaded"] else \
                    f"pool holds {s['pool_size']} of the {s['min_pool']} images it needs"
                self._json({"status": "not ready", "reason": why}, HTTPStatus.SERVICE_UNAVAILABLE)
        elif path == "/api/status":
            _only(query, ())
            self._json(app.status_json())
        elif path == "/api/results":
            _only(query, ("after", "limit"))
            after = _int(query, "after", -1, -1, 10 ** 15)
            limit = _int(query, "limit", 100, 1, MAX_LIMIT)
            app.results.refresh()
            self._json({"results": app.results.after(after, limit)})
        elif path == "/metrics":
            _only(query, ())
            self._send(HTTPStatus.OK, app.metrics_text(), app._metrics.CONTENT_TYPE_LATEST)
        elif (m := _IMAGE_ROUTE.fullmatch(path)) is not None:
            _only(query, ("thumb",))
            if not _SEQ.fullmatch(m.group(2)):
                raise _BadRequest(HTTPStatus.NOT_FOUND, "images are addressed by sequence number: /image/SEQ")
            thumb = _int(query, "thumb", 0, 0, 1) == 1
            found = app.image(m.group(1), int(m.group(2)), thumb)
            if found is None:
                raise _BadRequest(HTTPStatus.NOT_FOUND, f"no {m.group(1)} for seq {int(m.group(2))}")
            self._send(HTTPStatus.OK, found[0], found[1], {"Cache-Control": "private, max-age=3600"})
        else:
            raise _BadRequest(HTTPStatus.NOT_FOUND, "not found")

    # ------------------------------------------------------------------------------------ token
    def _authorized(self, app: LiveServer, query: dict[str, str]) -> bool:
        if app.token is None:
            return True
        offered: list[str] = []
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                offered.append(urllib.parse.unquote(value))
        if "token" in query:
            offered.append(query["token"])
        # compare every offer, in constant time each: no early exit that times the token
        ok = False
        for value in offered:
            ok |= hmac.compare_digest(value.encode("utf-8", "replace"), app.token)
        if ok and "token" in query and urllib.parse.urlsplit(self.path).path == "/":
            # the page opened with ?token=: keep it in a cookie and drop it from the address bar
            self._cookie = f"{COOKIE}={urllib.parse.quote(query['token'])}; HttpOnly; SameSite=Strict; Path=/"
        return ok

    # ------------------------------------------------------------------------------------ answers
    def _json(self, obj: object, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(obj, allow_nan=False, default=str).encode()
        self._send(status, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, headers: dict | None = None) -> None:
        cookie = getattr(self, "_cookie", None)
        if cookie is not None and status == HTTPStatus.OK:
            status, body, headers = HTTPStatus.SEE_OTHER, b"", {"Location": "/"}
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
            self._cookie = None
        extra = dict(headers or {})
        extra.setdefault("Cache-Control", "no-store")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not getattr(self, "_head", False):
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("live page %s: %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-") -> None:  # noqa: ARG002 - never log a ?token=
        path = getattr(self, "path", "") or ""  # unset when the request line itself was refused
        log.debug("live page %s %s -> %s", getattr(self, "command", "-"), path.split("?")[0][:200], code)


def _local_host(header: str) -> bool:
    """The Host header names a loopback address or ``localhost`` (any port)."""
    host = header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return bool(host) and is_loopback(host)


# ----------------------------------------------------------------------------------------- queries
def _parse_query(query: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=8,
                                       errors="strict")
    except ValueError as e:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"malformed query string ({e})") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"query parameter {k!r} given twice")
        out[k] = v
    return out


def _only(query: dict[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"unknown query parameter {unknown[0]!r} (this route takes: {known})")


def _int(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"-?[0-9]{1,16}", text):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"{name} must be an integer {lo}..{hi}, got {text[:40]!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"{name} must be an integer {lo}..{hi}, got {value}")
    return value
