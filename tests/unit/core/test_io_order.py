"""``musc_edge.datasets.order_samples`` and ``grouped_by_type``: the stream order of ``score --window``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from musc_edge.core.errors import InputError
from musc_edge.datasets import Sample, grouped_by_type, order_samples


def sample(tmp_path: Path, name: str, kind: str | None = None, mtime_s: int | None = None) -> Sample:
    path = tmp_path / name
    path.write_bytes(b"x")
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return Sample(path=path, rel=name, defect_type=kind)


def test_order_by_name_keeps_the_listing_and_mtime_sorts_oldest_first(tmp_path) -> None:
    a, b, c = (sample(tmp_path, n, mtime_s=t) for n, t in (("a.png", 30), ("b.png", 10), ("c.png", 10)))
    gone = Sample(path=tmp_path / "gone.png", rel="gone.png")  # vanished: last
    listing = (a, gone, b, c)
    assert order_samples(listing, "name") == listing
    assert order_samples(listing, "mtime") == (b, c, a, gone)  # ties keep the listing order
    with pytest.raises(InputError, match="--order must be one of name, mtime"):
        order_samples(listing, "size")


def test_grouped_by_type_spots_the_mvtec_listing(tmp_path) -> None:
    def kinds(*types):
        return [sample(tmp_path, f"{i}.png", t) for i, t in enumerate(types)]

    assert grouped_by_type(kinds("blob", "blob", "good", "good", "good"))
    assert not grouped_by_type(kinds("blob", "good", "blob", "good"))  # interleaved: production-like
    assert not grouped_by_type(kinds("blob", "good", "good"))  # no defect repeats
    assert not grouped_by_type(kinds("good", "good"))  # one type
    assert not grouped_by_type(kinds(None, None, None))  # flat folder
