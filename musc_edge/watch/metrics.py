"""/metrics: Prometheus text format from results.jsonl and the daemon's status (docs/line.md).

Built with ``prometheus-client`` as a custom collector over a registry of its own: every scrape
reads the current :class:`~musc_edge.watch.live.ResultsSnapshot` and
:meth:`~musc_edge.watch.live.LiveStatus.snapshot`, so there is no second copy of the counts to
keep in step and nothing global (two servers in one process, as in the tests, do not collide).
Names follow Prometheus' conventions: ``_total`` counters, base units (seconds), ``_info`` for
build labels, ``_ratio`` for a 0-1 fraction.

The image counters come from results.jsonl, so they equal its lines and survive a restart;
``skipped`` and the feature/scoring histograms are this process's (Prometheus handles the reset
of a counter when the daemon restarts).
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)

from .live import LatencyStats, LiveStatus, ResultsLog

__all__ = ["CONTENT_TYPE_LATEST", "LiveCollector", "render"]


class LiveCollector:
    """A prometheus-client collector: ``collect()`` yields the metric families of one scrape."""

    def __init__(self, results: ResultsLog, status: LiveStatus) -> None:
        self.results, self.status = results, status

    def collect(self) -> Iterator[Metric]:
        r = self.results.snapshot()
        s = self.status.snapshot()
        yield CounterMetricFamily("musc_edge_images_scored_total",
                                  "Images scored and reported (lines of results.jsonl).", value=r.scored)
        yield CounterMetricFamily("musc_edge_images_anomalous_total",
                                  "Reported images with verdict anomalous.", value=r.anomalous)
        yield CounterMetricFamily("musc_edge_images_skipped_total",
                                  "Files skipped since this process started (could not be decoded).",
                                  value=s["skipped"])
        yield _histogram("musc_edge_feature_extraction_seconds",
                         "Backbone time per batch of images.", s["latency"]["features"])
        yield _histogram("musc_edge_scoring_seconds",
                         "Mutual scoring time per image against the pool.", s["latency"]["scoring"])
        yield _histogram("musc_edge_arrival_to_report_seconds",
                         "From a file's arrival to its result line (from results.jsonl).", r.end_to_end)
        yield _gauge("musc_edge_queue_length", "Files seen and not yet scored.", s["queue_length"])
        yield _gauge("musc_edge_window_fill_ratio", "Stream images in the pool over the window size.",
                     s["window_fill"])
        yield _gauge("musc_edge_pool_images", "Images in the pool, references included.", s["pool_size"])
        yield _gauge("musc_edge_reference_images", "Reference images seeding the pool.", s["references"])
        yield _gauge("musc_edge_ready", "1 when the model is loaded and the pool at its minimum size.",
                     1.0 if s["ready"] else 0.0)
        last = r.last or {}
        for name, key in (("musc_edge_last_raw_score", "raw_score"), ("musc_edge_last_image_score", "image_score")):
            if isinstance(last.get(key), (int, float)):
                yield _gauge(name, f"{key} of the latest result.", float(last[key]))
        if s["threshold"] is not None:
            yield _gauge("musc_edge_threshold", "Threshold on raw_score for the verdict.", float(s["threshold"]))
        info = InfoMetricFamily("musc_edge_build", "Model, weights, device and musc-edge version.")
        info.add_metric([], {"model": str(s["model"]), "weights": str(s["weights"]),
                             "device": str(s["device"]), "version": str(s["version"])})
        yield info


def registry_for(results: ResultsLog, status: LiveStatus) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LiveCollector(results, status))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _histogram(name: str, doc: str, stats: LatencyStats) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=stats.cumulative(), sum_value=stats.sum_s)
