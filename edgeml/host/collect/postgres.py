"""A private PostgreSQL cluster on a free loopback port, for tests and benchmarks.

Made with ``initdb`` and run with ``pg_ctl`` in a directory of our own, so a test can stop
and restart the database under a running collector without touching any other PostgreSQL on
the machine. ``initdb`` refuses to run as root: when we are root the cluster is owned by and
run as the ``postgres`` system user (``runuser``). Never listens on anything but 127.0.0.1;
stops only the server it started.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeml.errors import CollectError
from edgeml.host.broker import free_port


def pg_bin(name: str) -> str | None:
    """``initdb``/``pg_ctl``: on PATH or in Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


class PostgresCluster:
    """``PostgresCluster().start()``; ``url(dbname)``, ``create_database``, ``stop()``,
    ``restart()``, ``destroy()``. The port stays the same across restarts.

    The cluster lives in a fresh directory of its own under the system temp dir (the
    ``postgres`` user must be able to reach it, which a root-only test dir does not allow);
    :meth:`destroy` stops the server and removes it."""

    def __init__(self, *, port: int | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeml-pg-"))
        self.port = port or free_port()
        self.data = self.workdir / "pgdata"
        self.log_path = self.workdir / "postgres.log"
        self.initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise CollectError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self._as: list[str] = []
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise CollectError("running as root needs a 'postgres' user for initdb") from exc
            runuser = shutil.which("runuser")
            if not runuser:
                raise CollectError("running as root needs runuser to start PostgreSQL")
            self._as = [runuser, "-u", "postgres", "--"]
            self._owner = (pw.pw_uid, pw.pw_gid)
        self._started = False

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        res = subprocess.run([*self._as, *args], capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise CollectError(f"{Path(args[0]).name} failed: {res.stderr.strip()[-2000:]}")

    def start(self) -> PostgresCluster:
        if self._owner is not None:
            os.chown(self.workdir, *self._owner)
        if not (self.data / "PG_VERSION").exists():
            self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale=C")
            with open(self.data / "postgresql.conf", "a") as f:
                f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                        f"unix_socket_directories = '{self.workdir}'\n"
                        "fsync = off\nfull_page_writes = off\nshared_buffers = 64MB\n"
                        "max_connections = 40\n")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log_path), "-w",
                  "-t", "30", "start")
        self._started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        if not self._started:
            return
        with contextlib.suppress(CollectError, subprocess.TimeoutExpired):
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")
        self._started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
