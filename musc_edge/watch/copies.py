"""Exact copies of images already in the pool or reported (docs/watch.md, "What happens when").

A scored file that is renamed, touched or copied into the folder again is the same image. Scored
again it would find its own earlier copy in the pool: every one of its patches has a perfect match,
so it scores as the most normal image there is (0.977 -> 0 after a rename), and its earlier copy
loses a partner that tells it apart. The daemon hashes the bytes it reads anyway (SHA-256, the
``sha256`` of each result line, which ``sha256sum`` reproduces) and looks them up here first.

The index holds every pool image (references pinned) and the newest :data:`DEFAULT_LIMIT`
reported ones, filled at start from results.jsonl and the pool's entries: what a lost journal or
a fresh state no longer remembers, the results still do.
"""

from __future__ import annotations

from collections import OrderedDict

#: Hashes kept besides the pinned ones (about 250 bytes each: 12 MB at most).
DEFAULT_LIMIT = 50_000


class ContentIndex:
    """SHA-256 digest -> (seq, path) of the image that first had those bytes."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = int(limit)
        self._pinned: dict[bytes, tuple[int, str]] = {}
        self._recent: OrderedDict[bytes, tuple[int, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pinned) + len(self._recent)

    def add(self, digest: bytes, seq: int, path: str, *, pinned: bool = False) -> None:
        """Remember an image; an image already known keeps its first seq (the copy is not it)."""
        if digest in self._pinned or digest in self._recent:
            return
        if pinned:
            self._pinned[digest] = (seq, path)
            return
        self._recent[digest] = (seq, path)
        while len(self._recent) > self.limit:
            self._recent.popitem(last=False)

    def add_hex(self, sha256: str | None, seq: int, path: str, *, pinned: bool = False) -> None:
        """:meth:`add` from a record's ``sha256`` field (absent in lines of older versions)."""
        if sha256:
            self.add(bytes.fromhex(sha256), seq, path, pinned=pinned)

    def get(self, digest: bytes) -> tuple[int, str] | None:
        return self._pinned.get(digest) or self._recent.get(digest)
