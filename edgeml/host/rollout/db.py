"""One small door to the fleet database for the rollout tables: SQLite or PostgreSQL.

The SQL in this package is written once with ``?`` placeholders and portable types (TEXT,
INTEGER, DOUBLE PRECISION); for PostgreSQL (psycopg 3) the placeholders become ``%s``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeml.errors import RolloutError


class Database:
    """A connection with ``query``/``execute`` and explicit commits."""

    def __init__(self, url: str, *, must_exist: bool = False) -> None:
        from edgeml.host.collect.sink import parse_db_url

        self.url = url
        self.kind, target = parse_db_url(url)
        if must_exist and self.kind == "sqlite" and target != ":memory:" and \
                not Path(target).exists():
            raise RolloutError(f"no fleet database at {target}")
        try:
            if self.kind == "sqlite":
                if target != ":memory:":
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                self._conn: Any = sqlite3.connect(target, timeout=30.0)
                self._conn.execute("PRAGMA busy_timeout = 30000")
            else:
                try:
                    import psycopg
                except ImportError as exc:
                    raise RolloutError("--db postgresql://... needs psycopg 3 "
                                       "(pip install 'psycopg[binary]')") from exc
                self._conn = psycopg.connect(target, connect_timeout=10)
        except RolloutError:
            raise
        except Exception as exc:
            raise RolloutError(f"cannot open the database {redact(url)}: {exc}") from exc

    def _sql(self, sql: str) -> str:
        return sql if self.kind == "sqlite" else sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence = ()) -> None:
        try:
            self._conn.execute(self._sql(sql), tuple(params))
        except Exception as exc:
            self._rollback_quietly()
            raise RolloutError(f"database error ({redact(self.url)}): {exc}") from exc

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        try:
            cur = self._conn.execute(self._sql(sql), tuple(params))
            rows = cur.fetchall()
        except Exception as exc:
            self._rollback_quietly()
            raise RolloutError(f"database error ({redact(self.url)}): {exc}") from exc
        if self.kind == "postgresql":
            self._conn.commit()  # end the read transaction: later reads see new rows
        return rows

    def has_table(self, name: str) -> bool:
        if self.kind == "sqlite":
            rows = self.query("SELECT name FROM sqlite_master WHERE name = ? "
                              "AND type IN ('table', 'view')", (name,))
        else:
            rows = self.query("SELECT to_regclass(?)", (name,))
            rows = [r for r in rows if r[0] is not None]
        return bool(rows)

    def commit(self) -> None:
        try:
            self._conn.commit()
        except Exception as exc:
            raise RolloutError(f"database commit failed ({redact(self.url)}): {exc}") from exc

    def _rollback_quietly(self) -> None:
        with contextlib.suppress(Exception):  # the original error is the one worth reporting
            self._conn.rollback()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def as_json(value: Any) -> Any:
    """A JSON column's value as Python: SQLite gives text, psycopg gives dicts for jsonb."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value
