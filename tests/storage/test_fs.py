"""edgeml.storage.fs, the one file-system helper every store uses: atomic writes leave the old
file or the new one (never half, never a temp file), files are created with their mode, and
a DirLock keeps a second process out until the holder closes it or dies (kill -9)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edgeml.errors import OutboxError, RawLogBusyError
from edgeml.storage import fs

# subprocesses import this very tree (like the pytest run itself)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
OLD = b'{"version": 1, "note": "old"}\n'
NEW = b'{"version": 2, "note": "new"}\n' * 1000


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


# ---- atomic writes -------------------------------------------------------------------------
def test_atomic_write_replaces_and_fsyncs(tmp_path: Path):
    p = tmp_path / "state.json"
    fs.atomic_write(p, OLD)
    fs.atomic_write(p, NEW, mode=0o644)
    assert p.read_bytes() == NEW
    assert _mode(p) == 0o644
    assert _leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path: Path, monkeypatch):
    p = tmp_path / "state.json"
    fs.atomic_write(p, OLD)

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        fs.atomic_write(p, NEW)
    assert p.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_fsync_fails(tmp_path: Path, monkeypatch):
    """The data is written but never made durable: it must not replace the old file."""
    p = tmp_path / "state.json"
    fs.atomic_write(p, OLD)

    def bad_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fs.os, "fsync", bad_fsync)
    with pytest.raises(OSError, match="Input/output"):
        fs.atomic_write(p, NEW)
    monkeypatch.undo()
    assert p.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_atomic_open_keeps_the_old_file_when_the_writer_fails_midway(tmp_path: Path):
    p = tmp_path / "bundle.edgeml"
    fs.atomic_write(p, OLD, mode=0o644)
    with pytest.raises(RuntimeError, match="midway"), fs.atomic_open(p, mode=0o644) as fh:
        fh.write(NEW[: len(NEW) // 2])
        raise RuntimeError("midway")
    assert p.read_bytes() == OLD
    assert _leftovers(tmp_path) == []
    with fs.atomic_open(p, mode=0o644) as fh:
        fh.write(NEW)
    assert p.read_bytes() == NEW


def test_atomic_write_into_a_missing_directory_fails_cleanly(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        fs.atomic_write(tmp_path / "nope" / "x", OLD)


def test_private_file_is_created_with_its_mode(tmp_path: Path, monkeypatch):
    """mode=0o600 holds from creation: at the moment of the rename the temp file already has
    it (no window where a permissive umask exposes a key), and whatever the umask."""
    seen: list[int] = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    old_umask = os.umask(0)
    try:
        monkeypatch.setattr(fs.os, "replace", spy)
        p = tmp_path / "signing.key"
        fs.atomic_write(p, b"-----BEGIN PRIVATE KEY-----\n", mode=0o600)
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert _mode(p) == 0o600


def test_generated_key_files_have_their_modes(tmp_path: Path):
    from edgeml.keys import generate_keypair

    priv, pub = generate_keypair(tmp_path / "release")
    assert _mode(priv) == 0o600
    assert _mode(pub) == 0o644
    assert _leftovers(tmp_path) == []


def test_write_new_refuses_an_existing_file(tmp_path: Path):
    p = tmp_path / "model.onnx"
    fs.write_new(p, OLD)
    with pytest.raises(FileExistsError):
        fs.write_new(p, NEW)
    assert p.read_bytes() == OLD


def test_fsync_helpers_accept_files_and_directories(tmp_path: Path):
    p = tmp_path / "f"
    p.write_bytes(OLD)
    fs.fsync_file(p)
    fs.fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fs.fsync_dir(p)


# ---- the directory lock --------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from edgeml.storage.fs import DirLock
    lock = DirLock(sys.argv[1], sys.argv[2])
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold(tmp_path: Path, name: str = ".lock", script: str = HOLDER) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline().strip()
    if line != "locked":
        proc.kill()
        proc.wait()
        pytest.fail(f"holder process did not take the lock: {line!r}")
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()


def test_dirlock_excludes_a_second_process_until_it_is_killed(tmp_path: Path):
    proc = _hold(tmp_path)
    try:
        with pytest.raises(BlockingIOError) as err:
            fs.DirLock(tmp_path)
        assert err.value.holder == str(proc.pid)
        assert f"held by pid {proc.pid}" in str(err.value)
    finally:
        _kill9(proc)
    assert proc.returncode == -signal.SIGKILL
    # the kernel dropped the flock with the process: no stale lock to clean up
    lock = fs.DirLock(tmp_path)
    assert lock.held
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert not lock.held


def test_dirlock_held_here_keeps_another_process_out(tmp_path: Path):
    script = textwrap.dedent("""
        import sys
        from edgeml.storage.fs import DirLock
        try:
            DirLock(sys.argv[1])
        except BlockingIOError as exc:
            print("busy", exc.holder)
            sys.exit(3)
        print("got it")
    """)
    with fs.DirLock(tmp_path):
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                           text=True, timeout=60, env=ENV)
        assert (r.returncode, r.stdout.split()) == (3, ["busy", str(os.getpid())])
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env=ENV)
    assert (r.returncode, r.stdout.strip()) == (0, "got it")


def test_locked_waits_for_the_holder(tmp_path: Path):
    """``locked`` (the model store's writer lock) queues behind a holder instead of failing,
    and goes ahead once the holder dies."""
    proc = _hold(tmp_path)
    try:
        killed_at = time.monotonic() + 0.5
        t = threading.Timer(0.5, os.kill, (proc.pid, signal.SIGKILL))
        t.start()
        with fs.locked(tmp_path):
            assert time.monotonic() >= killed_at - 0.05
        t.join()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


# ---- the stores translate a held lock into their own errors --------------------------------
def test_rawlog_held_by_another_process_names_its_pid(tmp_path: Path):
    from edgeml.storage.rawlog import LOCK_NAME, RawLog

    d = tmp_path / "rawlog" / "activity"
    d.mkdir(parents=True)
    proc = _hold(d, LOCK_NAME)
    try:
        with pytest.raises(RawLogBusyError,
                           match=rf"already open for writing \(pid {proc.pid}\)") as err:
            RawLog(d)
        assert isinstance(err.value.__cause__, BlockingIOError)
    finally:
        _kill9(proc)
    with RawLog(d) as log:  # the dead writer's lock is gone
        assert log.append("sensors/watch-01/imu", b'{"ax": 0.1}', 1.0) == 0


def test_outbox_held_by_another_process(tmp_path: Path):
    from edgeml.storage.outbox import LOCK_NAME, Outbox

    d = tmp_path / "outbox"
    d.mkdir()
    proc = _hold(d, LOCK_NAME)
    try:
        with pytest.raises(OutboxError, match="in use by another process") as err:
            Outbox(d)
        assert isinstance(err.value.__cause__, BlockingIOError)
    finally:
        _kill9(proc)
    with Outbox(d) as ob:
        assert ob.stats()["backlog"] == 0
