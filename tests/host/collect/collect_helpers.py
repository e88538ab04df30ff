"""Helpers for the collector tests: ``edgeml collect`` as a subprocess, database reads."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[3]


class CollectProcess:
    """``edgeml collect`` as a subprocess; its JSON status lines are kept in ``statuses``.
    ``kill_leftovers()`` kills those still running (the tests call it after each test)."""

    started: ClassVar[list[CollectProcess]] = []

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeml", "collect", "--status-interval", "0.2",
             "--json-status", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        CollectProcess.started.append(self)
        self.statuses: list[dict] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._ready = False
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self.proc.poll() is not None, 30):
                raise TimeoutError("collector did not start")
        if not self._ready:
            raise RuntimeError("collector failed: " + "".join(self.stderr))

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                if line.startswith("collect: ready"):
                    self._ready = True
                elif line.startswith("{"):
                    self.statuses.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_status(self, predicate, timeout: float = 30.0) -> dict:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(predicate(s) for s in self.statuses) or self.proc.poll() is not None,
                timeout)
            hit = [s for s in self.statuses if predicate(s)]
        if not ok or not hit:
            raise TimeoutError(f"no such status; last {self.statuses[-1:]}, "
                               f"stderr {''.join(self.stderr)[-2000:]}")
        return hit[0]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def db_ids(db: str) -> set[str]:
    if db.startswith("sqlite:///"):
        conn = sqlite3.connect(db[len("sqlite:///"):])
    else:
        import psycopg

        conn = psycopg.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT record_id FROM records").fetchall()}
    finally:
        conn.close()


def wait_db(db: str, want: set[str], timeout: float = 60.0) -> set[str]:
    """Poll the database until it holds ``want`` (the collector gives no event we can see
    from here about rows another process committed)."""
    deadline = time.monotonic() + timeout
    have: set[str] = set()
    while time.monotonic() < deadline:
        try:
            have = db_ids(db)
        except Exception:
            have = set()
        if want <= have:
            return have
        time.sleep(0.1)
    return have




def kill_leftovers() -> None:
    """Kill the collectors a failed test left running (by their pid)."""
    for c in CollectProcess.started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)
    CollectProcess.started.clear()
