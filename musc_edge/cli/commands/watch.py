"""``musc-edge watch``: score each new image in a folder against a rolling pool."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from musc_edge.cli.options import (device_option, heatmaps_option, k_option, match_radius_option, max_file_size_option, mem_budget_option,
                                   model_option, out_option, precision_option, r_option, read_threshold_file,
                                   score_device_option, threshold_file_option)
from musc_edge.core.errors import InputError

log = logging.getLogger(__name__)

#: Where a token or password comes from when no file is given (docs/line.md, "Secrets").
HTTP_TOKEN_ENV = "MUSC_EDGE_HTTP_TOKEN"
MQTT_PASSWORD_ENV = "MUSC_EDGE_MQTT_PASSWORD"
_HZ = click.FloatRange(0.0, min_open=True)


def line_options(f):
    """The line's outputs (docs/line.md): the live page, MQTT, a webhook, the threshold file, the source tag."""
    options = [
        click.option("--http", "http", default=None, metavar="[HOST:]PORT",
                     help="Serve the live page, its JSON API and /metrics (read-only) on HOST:PORT [HOST: 127.0.0.1]. "
                          "Any address but loopback needs a token."),
        click.option("--http-token-file", "http_token_file", default=None, metavar="FILE",
                     type=click.Path(dir_okay=False, path_type=Path),
                     help=f"File holding the page's token (first line; >= 16 characters) [else env {HTTP_TOKEN_ENV}]."),
        click.option("--http-token", "http_token", default=None, metavar="TOKEN",
                     help="The page's token on the command line (`ps` shows it: prefer --http-token-file)."),
        threshold_file_option,
        click.option("--source", "source", default=None, metavar="NAME",
                     help="Tag every MQTT/webhook message with source NAME (a camera, a line)."),
        click.option("--mqtt", "mqtt", default=None, metavar="HOST[:PORT]",
                     help="Publish each result to this MQTT broker (QoS 1, waits for the ack) [port 1883, 8883 with TLS]."),
        click.option("--mqtt-topic", "mqtt_topic", default="musc-edge/results", show_default=True, metavar="TOPIC"),
        click.option("--mqtt-username", "mqtt_username", default=None, metavar="USER"),
        click.option("--mqtt-password-file", "mqtt_password_file", default=None, metavar="FILE",
                     type=click.Path(dir_okay=False, path_type=Path),
                     help=f"File holding the MQTT password (first line) [else env {MQTT_PASSWORD_ENV}]."),
        click.option("--mqtt-tls", "mqtt_tls", is_flag=True, help="TLS to the broker (system CAs unless --mqtt-ca)."),
        click.option("--mqtt-ca", "mqtt_ca", default=None, metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
                     help="CA file (PEM) for the broker's certificate; implies --mqtt-tls."),
        click.option("--mqtt-cert", "mqtt_cert", default=None, metavar="FILE",
                     type=click.Path(dir_okay=False, path_type=Path), help="Client certificate (PEM); implies --mqtt-tls."),
        click.option("--mqtt-key", "mqtt_key", default=None, metavar="FILE",
                     type=click.Path(dir_okay=False, path_type=Path), help="Client key (PEM) of --mqtt-cert."),
        click.option("--mqtt-insecure", "mqtt_insecure", is_flag=True,
                     help="With TLS: do not check the broker's host name (the chain is still checked)."),
        click.option("--mqtt-protocol", "mqtt_protocol", default="3.1.1", show_default=True,
                     type=click.Choice(["3.1.1", "5"])),
        click.option("--mqtt-rate-limit", "mqtt_rate_limit", default=None, type=_HZ, metavar="HZ",
                     help="Attach the heatmap overlay (JPEG) to at most HZ messages per second; needs --heatmaps."),
        click.option("--webhook", "webhook", default=None, metavar="URL",
                     help="POST each result as JSON to URL (2xx = delivered; else retried with backoff)."),
        click.option("--webhook-header", "webhook_headers", multiple=True, metavar="'NAME: VALUE'",
                     help="Header on every POST (repeatable); VALUE may be env:VAR or file:PATH for secrets."),
        click.option("--webhook-timeout", "webhook_timeout", default=10.0, show_default=True, type=_HZ, metavar="S"),
        click.option("--webhook-rate-limit", "webhook_rate_limit", default=None, type=_HZ, metavar="HZ",
                     help="Attach the heatmap overlay (JPEG) to at most HZ POSTs per second; needs --heatmaps."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(name="watch")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@model_option
@out_option
@click.option("--window", "window", default=32, show_default=True, type=click.IntRange(1),
              help="Stream images in the rolling pool (W); each new image costs W pair products. Its memory "
                   "grows with W^2 and is checked against --mem-budget before anything is allocated.")
@mem_budget_option
@click.option("--delay", default=0, show_default=True, type=click.IntRange(0),
              help="Report an image once D newer images have arrived (0: at once; D < W).")
@click.option("--min-pool", "min_pool", default=None, type=click.IntRange(2),
              help="Report nothing until the pool (references included) holds this many images "
                   "[default: 8, or the pool's size if smaller].")
@click.option("--reference", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of known-good images that seed the pool and never leave it.")
@click.option("--threshold", type=float, default=None,
              help="Add verdict 'anomalous' when raw_score >= T, else 'good' (raw: comparable across windows).")
@heatmaps_option
@click.option("--keep-heatmaps", "keep_heatmaps", default=None, type=click.IntRange(1), metavar="N",
              help="With --heatmaps: keep only the newest N overlays (older ones are deleted) [default: keep all; "
                   "they grow with every image].")
@click.option("--poll", is_flag=True, help="Poll the folder instead of inotify (network mounts).")
@click.option("--poll-interval", "poll_interval", default=1.0, show_default=True, type=click.FloatRange(0.05),
              help="Seconds between scans with --poll.")
@click.option("--new-only", "new_only", is_flag=True,
              help="Ignore files older than the first start (by mtime); default: score them too.")
@click.option("--recursive", is_flag=True, help="Also watch sub-folders.")
@click.option("--stable", "stable_s", default=0.5, show_default=True, type=click.FloatRange(0.0),
              help="Seconds a file's size and mtime must stay unchanged before it is read.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Largest backbone batch when a backlog of files is ready at once.")
@max_file_size_option
@r_option
@k_option
@match_radius_option
@device_option
@score_device_option
@precision_option
@line_options
def watch(folder: Path, model_path: Path, out_dir: Path, window: int, delay: int, min_pool: int | None,
          reference: Path | None, threshold: float | None, heatmaps: bool, keep_heatmaps: int | None, poll: bool,
          poll_interval: float, new_only: bool, recursive: bool, stable_s: float, batch: int,
          max_file_bytes: int | None, r_list: tuple[int, ...], k_list: tuple[int, ...], match_radius: int | None,
          device: str,
          mem_budget: int | None, score_device: str, precision: str, **line) -> None:
    """Watch FOLDER and score each new image as it lands.

    One JSON line per image is appended to OUT/results.jsonl (flushed and fsynced); the pool and a
    journal live in OUT/state/, so after a crash a restart reports every image exactly once.
    SIGINT/SIGTERM finish the current image and exit 0.

    On the line (docs/line.md): --http serves a live page and /metrics, --mqtt and --webhook push
    every result (fed from results.jsonl; an output that is down never slows scoring), and
    --threshold-file sets the threshold computed by `musc-edge threshold`.
    """
    from musc_edge.core.params import MuscParams
    from musc_edge.runtime.model import load_model
    from musc_edge.watch.daemon import WatchConfig, WatchDaemon

    # everything the user can get wrong is checked before the model loads (one line, exit 2)
    http, http_token = _http(line)
    threshold_info = read_threshold_file(line["threshold_file"], threshold)
    sinks = line_sinks(line, heatmaps)
    config = WatchConfig(folder=folder, out_dir=out_dir, window=window, delay=delay, min_pool=min_pool,
                         reference=reference, threshold=threshold, threshold_info=threshold_info, http=http,
                         http_token=http_token, heatmaps=heatmaps, keep_heatmaps=keep_heatmaps,
                         poll=poll, max_file_bytes=max_file_bytes,
                         poll_interval_s=poll_interval, new_only=new_only, recursive=recursive,
                         stable_s=stable_s, batch=batch, params=MuscParams.of(r_list, None, k_list, match_radius),
                         mem_budget_bytes=mem_budget, score_device=score_device, precision=precision)
    with load_model(model_path, device) as model:
        summary = _run(WatchDaemon(config, model, sinks=sinks), out_dir)
    copies = f", {summary.copies} exact copies not scored" if summary.copies else ""
    click.echo(f"stopped: {summary.scored} images scored, {summary.reported} reported, "
               f"{summary.skipped} skipped{copies}", err=True)


def _run(daemon, out_dir: Path):
    """Run the daemon. A full disk while it runs only pauses it (docs/watch.md, "What happens when");
    one before its state is even open (no room for state/) is a one-line error."""
    from musc_edge.core.errors import StateError
    from musc_edge.watch.daemon import DISK_FULL

    try:
        return daemon.run()
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise StateError(f"no space left on the disk of {out_dir} ({e.filename or e.strerror}): free some space "
                         "there and start again; nothing is lost") from None


def _http(line: dict) -> tuple[tuple[str, int] | None, str | None]:
    """``--http`` and its token: (host, port) and the token; a refused bind fails here, before the model."""
    from musc_edge.watch.http import check_bind, parse_bind
    from musc_edge.watch.outbound import read_secret

    if line["http_token_file"] is not None and line["http_token"] is not None:
        raise InputError("give --http-token-file FILE or --http-token TOKEN, not both")
    if line["http"] is None:
        if line["http_token_file"] is not None or line["http_token"] is not None:
            raise InputError("--http-token-file / --http-token protect the live page: give --http [HOST:]PORT too")
        return None, None
    host, port = parse_bind(line["http"])
    if line["http_token_file"] is not None:
        token = read_secret(file=line["http_token_file"], what="--http-token-file")
    elif line["http_token"] is not None:
        log.warning("--http-token is visible to every user of this machine (ps, /proc); use --http-token-file "
                    "FILE or %s instead", HTTP_TOKEN_ENV)
        token = line["http_token"]
    else:
        token = read_secret(env=HTTP_TOKEN_ENV)
    check_bind(host, token)
    return (host, port), token


def _host_port(text: str, flag: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` (``[v6]:PORT`` too) -> (host, port or None)."""
    text = text.strip()
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:] if end > 0 else "?"
        if end < 0 or (rest and not rest.startswith(":")):
            raise InputError(f"{flag} expects HOST[:PORT], e.g. broker.local:1883 or [::1]:1883, got {text!r}")
        host, port = text[1:end], rest[1:] or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or (port is not None and not (port.isdigit() and 1 <= int(port) <= 65535)):
        raise InputError(f"{flag} expects HOST[:PORT] with a port 1..65535, e.g. broker.local:1883, got {text!r}")
    return host, int(port) if port is not None else None


def line_sinks(line: dict, heatmaps: bool) -> list:
    """The MQTT and webhook sinks the flags ask for (none: an empty list), built and checked now."""
    from musc_edge.watch.outbound import ImagePayloads, parse_header, read_secret

    for flag, key in (("--mqtt-rate-limit", "mqtt_rate_limit"), ("--webhook-rate-limit", "webhook_rate_limit")):
        if line[key] is not None and not heatmaps:
            raise InputError(f"{flag} attaches the heatmap overlays to the messages: it needs --heatmaps")
    _needs(line, "mqtt", "--mqtt HOST[:PORT]", ("mqtt_username", "mqtt_password_file", "mqtt_tls", "mqtt_ca",
                                                 "mqtt_cert", "mqtt_key", "mqtt_insecure", "mqtt_rate_limit"))
    _needs(line, "webhook", "--webhook URL", ("webhook_headers", "webhook_rate_limit"))

    def images(hz: float | None):
        return ImagePayloads(hz, time.monotonic) if hz else None

    sinks = []
    if line["mqtt"] is not None:
        from musc_edge.watch.mqtt import MqttSink, MqttTls

        host, port = _host_port(line["mqtt"], "--mqtt")
        tls_on = bool(line["mqtt_tls"] or line["mqtt_ca"] or line["mqtt_cert"] or line["mqtt_key"])
        if line["mqtt_insecure"] and not tls_on:
            raise InputError("--mqtt-insecure relaxes TLS: give --mqtt-tls (or --mqtt-ca) too")
        password = read_secret(file=line["mqtt_password_file"], what="--mqtt-password-file")
        if password is None and line["mqtt_username"] is not None:
            password = read_secret(env=MQTT_PASSWORD_ENV)
        tls = (MqttTls(ca_file=line["mqtt_ca"], cert_file=line["mqtt_cert"], key_file=line["mqtt_key"],
                       insecure=line["mqtt_insecure"]) if tls_on else None)
        sinks.append(MqttSink(host, port, line["mqtt_topic"], username=line["mqtt_username"], password=password,
                              tls=tls, protocol=line["mqtt_protocol"], images=images(line["mqtt_rate_limit"]),
                              source=line["source"]))
    if line["webhook"] is not None:
        from musc_edge.watch.webhook import WebhookSink

        sinks.append(WebhookSink(line["webhook"], headers=[parse_header(h) for h in line["webhook_headers"]],
                                 timeout_s=line["webhook_timeout"], images=images(line["webhook_rate_limit"]),
                                 source=line["source"]))
    if line["source"] is not None and not sinks:
        log.warning("--source tags MQTT and webhook messages; without --mqtt or --webhook it does nothing")
    return sinks


def _needs(line: dict, key: str, what: str, dependents: tuple[str, ...]) -> None:
    if line[key] is not None:
        return
    given = [d for d in dependents if line[d]]
    if given:
        flags = ", ".join("--" + d.replace("_", "-").replace("headers", "header") for d in given)
        raise InputError(f"{flags} configure{'s' if len(given) == 1 else ''} an output that is not on: give {what} too")
