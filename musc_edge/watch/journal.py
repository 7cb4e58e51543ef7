"""Durable state of the watch daemon: results.jsonl and OUTDIR/state/ (docs/watch.md, "State and crash safety").

The promise is that after a crash (kill -9, power loss) and a restart every image appears in
``results.jsonl`` exactly once. It rests on four files, each written so that a crash leaves either
the old or the new version, never half of one:

- ``state/entries/<seq>.npz``: the prepared window entry of each image in the pool (its tokens,
  embedding and pair rows, :class:`musc_edge.core.window.Entry`). Written *first*, atomically
  (temp file, fsync, rename, fsync of the folder: :func:`musc_edge.core.durable.atomic_write_bytes` with
  ``fsync=True``): it is the redo log of the image being added.
- ``results.jsonl``: one line per reported image carrying its ``seq``. Reports come in seq order,
  so the highest seq in the file says what has been reported; a line cut by a crash is dropped.
  It is the durable record every output is fed from: the sinks of :mod:`musc_edge.watch.sinks`
  read it by seq after the commit (STYLE.md, "Outputs as sinks over a durable log"), so adding an
  output never touches this protocol, and a failing output cannot change this file.
- ``state/journal.jsonl``: append-only; one record per processed file (``seq``, path, size, mtime)
  and one per skipped file, so neither is looked at again.
- ``state/state.json``: the commit point, rewritten atomically after each image: the model's
  metadata, the settings, ``next_seq`` and the window's order (references, stream, pending).

The daemon adds image k in this order: entry k, results lines, journal record, state.json
(``next_seq = k + 1``), then deletes the entries that left the window. On start, an entry with seq
== ``next_seq`` means the crash came after the entry was written: that image is replayed from its
entry (no backbone needed) and only result lines with a seq above the file's highest are written,
journal records of seq >= ``next_seq`` are ignored until written again.

Around that protocol (docs/watch.md, "What happens when"): temporary files a ``kill -9`` left
mid-write are removed on open; an entry that cannot be read is a one-line :class:`EntryError`
naming the file and the way out; and results.jsonl, which outlives a state moved away or a lost
journal, gives the last reported seq and the content hashes of the reported images.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from musc_edge.core.durable import atomic_write_bytes
from musc_edge.core.errors import StateError
from musc_edge.core.window import Entry

from .paths import real_path

log = logging.getLogger(__name__)

STATE_VERSION = 1

#: Reported images whose content hashes are read back at start (the newest ones), for the copy check.
REPORTED_KEPT = 50_000

#: What :func:`musc_edge.core.durable.atomic_write_bytes` names its temporary file: ``.{name}.XXXXXXXX.tmp``.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


class EntryError(StateError):
    """A pool entry in state/entries/ that cannot be read (truncated, garbled)."""


# ----------------------------------------------------------------------------------------- primitives
def append_durably(path: Path, lines: Iterable[str]) -> None:
    """Append whole lines in one write, then flush and fsync."""
    text = "".join(line.rstrip("\n") + "\n" for line in lines)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict]:
    """Read a JSON-lines file. A last line cut short by a crash is dropped (and cut off the file
    when ``repair``); a bad line elsewhere is a :class:`StateError`.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl < 0:  # no newline: the tail of an interrupted write
            break
        try:
            records.append(json.loads(raw[pos:nl]))
        except json.JSONDecodeError:
            if raw.find(b"\n", nl + 1) >= 0:
                raise StateError(f"{path}: line {len(records) + 1} is not JSON; fix or move the file") from None
            break  # the last line was garbled by a crash
        pos = good_end = nl + 1
    if good_end < len(raw):
        log.warning("%s: dropping %d bytes of an interrupted write", path, len(raw) - good_end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
    return records


# ----------------------------------------------------------------------------------------- entries
def entry_to_bytes(entry: Entry) -> bytes:
    arrays = {f"tokens_{i}": t for i, t in enumerate(entry.tokens)}
    buf = io.BytesIO()
    np.savez(buf, seq=np.int64(entry.seq), embedding=entry.embedding, partners=entry.partners,
             d_out=entry.d_out, d_in=entry.d_in, info=np.array(json.dumps(entry.info)), **arrays)
    return buf.getvalue()


def entry_from_file(path: Path) -> Entry:
    """Read an entry; any damage (a cut or garbled zip, a missing array) is an :class:`EntryError`."""
    try:
        return _read_entry(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise EntryError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def _read_entry(path: Path) -> Entry:
    with np.load(path, allow_pickle=False) as f:
        n_layers = sum(1 for k in f.files if k.startswith("tokens_"))
        return Entry(seq=int(f["seq"]), tokens=tuple(f[f"tokens_{i}"] for i in range(n_layers)),
                     embedding=f["embedding"], partners=f["partners"], d_out=f["d_out"], d_in=f["d_in"],
                     info=json.loads(str(f["info"])))


# ----------------------------------------------------------------------------------------- state dir
class StateDir:
    """OUTDIR/results.jsonl and OUTDIR/state/, held under an exclusive lock while open."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "state"
        self.entries_dir = self.dir / "entries"
        self.results_path = self.out_dir / "results.jsonl"
        self.journal_path = self.dir / "journal.jsonl"
        self.state_path = self.dir / "state.json"
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / "lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateError(f"{self.out_dir} is in use by another musc-edge watch; stop it or pick another --out") from None
        self.remove_temp_files()
        self.last_reported = -1
        self.reported: list[tuple[str, int, str]] = []
        self.refresh()

    def close(self) -> None:
        self._lock.close()

    def refresh(self) -> None:
        """Read results.jsonl again, cutting a line torn by a crash or a full disk: the last reported
        seq, and (sha256, seq, path) of the newest :data:`REPORTED_KEPT` lines that carry a hash."""
        lines = read_jsonl(self.results_path, repair=True)
        self.last_reported = max((int(r["seq"]) for r in lines), default=-1)
        self.reported = [(r["sha256"], int(r["seq"]), real_path(r)) for r in lines[-REPORTED_KEPT:] if r.get("sha256")]

    def remove_temp_files(self) -> int:
        """Delete the temporary files of atomic writes cut short by a crash (under the lock, so no
        writer of ours is running): ``state/``, its ``entries/`` and ``sinks/``, ``heatmaps/``."""
        folders = [self.dir, self.entries_dir, self.dir / "sinks", self.out_dir / "heatmaps"]
        removed = 0
        for folder in folders:
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                if _TEMP_NAME.fullmatch(path.name):
                    path.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("removed %d temporary files left by interrupted writes under %s", removed, self.out_dir)
        return removed

    # state.json
    def load_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as e:
            raise StateError(f"{self.state_path} is corrupt ({e}); move {self.dir} away to start afresh") from None
        if not isinstance(state, dict):
            raise StateError(f"{self.state_path} is not a state object; move {self.dir} away to start afresh")
        if state.get("version") != STATE_VERSION:
            raise StateError(f"{self.state_path} has state version {state.get('version')}, this musc-edge "
                             f"reads {STATE_VERSION}; finish with the old version or use a new --out")
        return state

    def save_state(self, state: dict) -> None:
        atomic_write_bytes(self.state_path, json.dumps({**state, "version": STATE_VERSION}).encode(), fsync=True)

    # entries
    def entry_path(self, seq: int) -> Path:
        return self.entries_dir / f"{seq:012d}.npz"

    def save_entry(self, entry: Entry) -> None:
        """Write an entry durably; rows computed on a GPU are copied to the host first."""
        entry = entry.to_host()
        atomic_write_bytes(self.entry_path(entry.seq), entry_to_bytes(entry), fsync=True)

    def load_entry(self, seq: int) -> Entry:
        """The entry of ``seq``; :class:`EntryError` (one line: the file, the cause) when damaged."""
        return entry_from_file(self.entry_path(seq))

    def has_entry(self, seq: int) -> bool:
        return self.entry_path(seq).exists()

    def drop_entries_except(self, keep: set[int]) -> None:
        for path in self.entries_dir.glob("*.npz"):
            if path.stem.isdigit() and int(path.stem) not in keep:
                path.unlink(missing_ok=True)

    def delete_entry(self, seq: int) -> None:
        self.entry_path(seq).unlink(missing_ok=True)

    # results and journal
    def report(self, lines: list[dict]) -> int:
        """Append result lines whose seq is above the last reported one; returns how many.

        The only writer of results.jsonl, the durable record: the sinks read it, never write it.
        """
        fresh = [line for line in lines if int(line["seq"]) > self.last_reported]
        append_durably(self.results_path, (json.dumps(line) for line in fresh))
        if fresh:
            self.last_reported = int(fresh[-1]["seq"])
        return len(fresh)

    def journal(self, record: dict) -> None:
        append_durably(self.journal_path, [json.dumps(record)])

    @property
    def has_journal(self) -> bool:
        return self.journal_path.exists()

    def journal_records(self, next_seq: int) -> list[dict]:
        """Committed journal records: skips, and processed files with seq < ``next_seq``."""
        return [r for r in read_jsonl(self.journal_path, repair=True)
                if "seq" not in r or int(r["seq"]) < next_seq]

    def compact_journal(self, records: list[dict]) -> None:
        """Rewrite the journal with only ``records`` (those whose files still exist)."""
        atomic_write_bytes(self.journal_path, "".join(json.dumps(r) + "\n" for r in records).encode(), fsync=True)
