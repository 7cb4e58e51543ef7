"""``musc_edge.core.durable.atomic_write_bytes``: one atomic writer for batch outputs and the watch state."""

from __future__ import annotations

import os

import pytest

from musc_edge.core import durable as mio


def test_replaces_content_and_leaves_no_temp_file(tmp_path) -> None:
    path = tmp_path / "sub" / "state.json"
    mio.atomic_write_bytes(path, b"old")
    mio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


@pytest.mark.parametrize("fsync, expected", [(False, 0), (True, 2)])
def test_fsync_syncs_the_file_and_its_folder(tmp_path, monkeypatch, fsync, expected) -> None:
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_mode)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    mio.atomic_write_bytes(tmp_path / "x.bin", b"data", fsync=fsync)
    assert len(synced) == expected
    if fsync:  # the file first (before the rename), then the folder (after it)
        import stat

        assert stat.S_ISREG(synced[0]) and stat.S_ISDIR(synced[1])


def test_failed_write_keeps_the_old_content(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x.bin"
    mio.atomic_write_bytes(path, b"old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        mio.atomic_write_bytes(path, b"new", fsync=True)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        mio.atomic_write_bytes(tmp_path / "a.bin", b"x")
        os.umask(0o077)
        mio.atomic_write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600  # a stricter umask is honoured
