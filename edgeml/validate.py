"""One small reader for validating nested mappings: the TOML config, firmware profiles and
bundle manifests all go through it.

A :class:`Table` wraps one mapping (a :class:`Seq` one list) together with the dotted key that
leads to it (``pipelines[0].window``), the file it came from and an *error factory* that turns
``(message, key=, file=)`` into the exception to raise. Typed getters take a key out, check
its type and range and return it; a key that is absent gets the default (``REQUIRED``: an
error), and when the default is ``None`` an explicit ``null`` (JSON) counts as absent too.
:meth:`Table.finish` refuses the keys nobody asked for, suggesting the closest known one.

Every message names the full key, the file (when there is one) and the offending value::

    t = Table(doc, file="/etc/edgeml/edgeml.toml", error=ConfigError)
    size = t.table("window").int("size", min=1)
    # ConfigError: /etc/edgeml/edgeml.toml: window.size: 0 is out of range (expected >= 1)

``error`` is any callable ``(message, *, key, file) -> Exception``: :class:`ConfigError` and
:class:`ProfileError` qualify as they are. ``bool`` is never accepted where an integer or a
number is expected (Python's ``True`` is an ``int``; a config's ``true`` is not a count).
Values given as keyword arguments rather than a file can be checked the same way, e.g.
``Table({"retry_min_s": retry_min_s}, "sync").number("retry_min_s", min=0, min_open=True)``.
"""

from __future__ import annotations

import builtins
import difflib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from edgeml.errors import ConfigError

__all__ = ["REQUIRED", "ErrorFactory", "Seq", "Table", "short_repr", "type_name"]

log = logging.getLogger("edgeml.validate")

_str = builtins.str
_int = builtins.int
_bool = builtins.bool


class _Required:
    def __repr__(self) -> _str:
        return "REQUIRED"


#: The default of a key that must be given.
REQUIRED: Any = _Required()


class ErrorFactory(Protocol):
    def __call__(self, message: _str, *, key: _str | None, file: _str | None) -> Exception: ...


def type_name(value: Any, mapping: _str = "table") -> _str:
    """The user's word for the type of ``value`` (TOML/JSON words, not Python's)."""
    if value is None:
        return "null"
    if isinstance(value, _bool):
        return "boolean"
    if isinstance(value, _int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, _str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return mapping
    return type(value).__name__


def short_repr(value: Any, limit: _int = 60) -> _str:
    """``repr`` cut short: values may come from the network and be huge."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _bounds(lo: float | None, hi: float | None, lo_open: _bool, hi_open: _bool) -> _str:
    def g(v: float) -> _str:
        return f"{v:g}" if isinstance(v, float) else _str(v)

    if lo is not None and hi is not None and not lo_open and not hi_open:
        return f"{g(lo)}..{g(hi)}"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {g(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {g(hi)}")
    return " and ".join(parts)


class _Node:
    """What :class:`Table` and :class:`Seq` share: the typed getters."""

    def __init__(self, prefix: _str, file: _str | None, error: ErrorFactory,
                 mapping: _str) -> None:
        self.prefix = prefix
        self.file = file
        self._error = error
        self._mapping = mapping

    # --- to override ---
    def key(self, name: Any) -> _str:
        raise NotImplementedError

    def _lookup(self, name: Any) -> tuple[_bool, Any]:
        """(present, value); a Table also marks the key as read."""
        raise NotImplementedError

    # --- errors ---
    def error(self, name: Any, message: _str) -> Exception:
        """The exception for ``message`` about key ``name`` (None: this table or list)."""
        key = self.key(name) if name is not None else (self.prefix or None)
        return self._error(message, key=key, file=self.file)

    def _child_kw(self) -> dict[_str, Any]:
        return {"file": self.file, "error": self._error, "mapping": self._mapping}

    def _get(self, name: Any, default: Any) -> tuple[_bool, Any]:
        """(found, value): found is False when the default applies."""
        present, value = self._lookup(name)
        if not present or (value is None and default is None):
            if default is REQUIRED:
                raise self.error(name, "missing (required)")
            return False, default
        return True, value

    def _wrong_type(self, name: Any, what: _str, value: Any) -> Exception:
        return self.error(name, f"expected {what}, got {type_name(value, self._mapping)} "
                                f"{short_repr(value)}")

    # --- getters ---
    def value(self, name: Any, default: Any = REQUIRED) -> Any:
        """The raw value, unchecked."""
        return self._get(name, default)[1]

    def typed(self, name: Any, types: type | tuple[type, ...], default: Any = REQUIRED, *,
              what: _str | None = None) -> Any:
        """A value of one of ``types`` (a bool only when ``bool`` is listed)."""
        found, value = self._get(name, default)
        if not found:
            return value
        ts = types if isinstance(types, tuple) else (types,)
        if (isinstance(value, _bool) and _bool not in ts) or not isinstance(value, ts):
            raise self._wrong_type(name, what or " or ".join(t.__name__ for t in ts), value)
        return value

    def str(self, name: Any, default: Any = REQUIRED, *, nonempty: _bool = False,
            pattern: re.Pattern[_str] | None = None, what: _str = "") -> Any:
        """A string; ``nonempty`` refuses ``""``; ``pattern`` must match all of it (the error
        says the value "is not ``what``")."""
        found, value = self._get(name, default)
        if not found:
            return value
        if not isinstance(value, _str):
            raise self._wrong_type(name, "a string", value)
        if nonempty and not value:
            raise self.error(name, "must not be empty")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.error(name, f"{short_repr(value)} is not {what or 'valid'}")
        return value

    def int(self, name: Any, default: Any = REQUIRED, *, min: _int | None = None,
            max: _int | None = None) -> Any:
        """An integer (never a boolean) within ``min..max`` (inclusive)."""
        found, value = self._get(name, default)
        if not found:
            return value
        if isinstance(value, _bool) or not isinstance(value, _int):
            raise self._wrong_type(name, "an integer", value)
        if (min is not None and value < min) or (max is not None and value > max):
            raise self.error(name, f"{value} is out of range (expected "
                                   f"{_bounds(min, max, False, False)})")
        return value

    def number(self, name: Any, default: Any = REQUIRED, *, min: float | None = None,
               max: float | None = None, min_open: _bool = False, max_open: _bool = False,
               finite: _bool = True) -> Any:
        """An integer or float (never a boolean), returned as float; NaN and infinities are
        refused unless ``finite=False``; ``min_open``/``max_open`` exclude the bound."""
        found, value = self._get(name, default)
        if not found:
            return value
        if isinstance(value, _bool) or not isinstance(value, (_int, float)):
            raise self._wrong_type(name, "a number", value)
        value = float(value)
        if math.isnan(value) or (finite and math.isinf(value)):
            raise self.error(name, f"must be a finite number, got {value}")
        if ((min is not None and (value <= min if min_open else value < min))
                or (max is not None and (value >= max if max_open else value > max))):
            raise self.error(name, f"{value:g} is out of range (expected "
                                   f"{_bounds(min, max, min_open, max_open)})")
        return value

    def bool(self, name: Any, default: Any = REQUIRED) -> Any:
        found, value = self._get(name, default)
        if found and not isinstance(value, _bool):
            raise self._wrong_type(name, "true or false", value)
        return value

    def choice(self, name: Any, choices: Sequence[_str], default: Any = REQUIRED) -> Any:
        """One of the strings in ``choices``."""
        found, value = self._get(name, default)
        if not found:
            return value
        listed = ", ".join(choices)
        if not isinstance(value, _str):
            raise self._wrong_type(name, f"one of {listed}", value)
        if value not in choices:
            raise self.error(name, f"{short_repr(value)} is not one of {listed}")
        return value

    def list_of_str(self, name: Any, default: Any = REQUIRED, *, nonempty: _bool = False,
                    unique: _bool = False, pattern: re.Pattern[_str] | None = None,
                    what: _str = "") -> Any:
        """A tuple of non-empty strings (each checked like :meth:`str` with ``pattern``);
        ``nonempty`` refuses an empty list, ``unique`` a repeated item."""
        seq = self.seq(name, default)
        if not isinstance(seq, Seq):
            return seq if seq is None else tuple(seq)
        if nonempty and not len(seq):
            raise self.error(name, "must not be empty")
        items = tuple(seq.str(i, nonempty=True, pattern=pattern, what=what)
                      for i in range(len(seq)))
        if unique:
            for i, item in enumerate(items):
                if item in items[:i]:
                    raise seq.error(i, f"{short_repr(item)} is listed twice")
        return items

    def table(self, name: Any, default: Any = REQUIRED) -> Any:
        """The nested mapping as a :class:`Table` (the default, unless None, is wrapped too, so
        the caller reads defaults the same way). Call its :meth:`Table.finish`."""
        found, value = self._get(name, default)
        if not found and value is None:
            return None
        if found and not isinstance(value, Mapping):
            raise self._wrong_type(name, f"a{'n' if self._mapping[0] in 'aeiou' else ''} "
                                         f"{self._mapping}", value)
        return Table(value, self.key(name), **self._child_kw())

    def seq(self, name: Any, default: Any = REQUIRED) -> Any:
        """The nested list as a :class:`Seq` (a default is wrapped, unless None)."""
        found, value = self._get(name, default)
        if not found and value is None:
            return None
        if found and not isinstance(value, (list, tuple)):
            raise self._wrong_type(name, "an array", value)
        return Seq(value, self.key(name), **self._child_kw())

    def mapping(self, name: Any, default: Any = REQUIRED) -> Any:
        """A nested mapping as a plain dict with string keys, its contents unchecked."""
        t = self.table(name, default)
        if t is None:
            return None
        for k in t.data:
            if not isinstance(k, _str):
                raise t.error(None, f"key {short_repr(k)} is not a string")
        return dict(t.data)


class Table(_Node):
    """A reader over one mapping. Getters mark the keys they read; :meth:`finish` refuses the
    rest. Reading a key twice gives the same value."""

    def __init__(self, data: Any, prefix: _str = "", *, file: _str | None = None,
                 error: ErrorFactory = ConfigError, mapping: _str = "table") -> None:
        super().__init__(prefix, file, error, mapping)
        if not isinstance(data, Mapping):
            raise self._error(
                f"expected a{'n' if mapping[0] in 'aeiou' else ''} {mapping}, got "
                f"{type_name(data, mapping)} {short_repr(data)}", key=prefix or None, file=file)
        self.data: Mapping[Any, Any] = data
        self._asked: list[Any] = []
        #: Optional declaration of every key this table takes. When set, :meth:`finish`
        #: suggests from it too, and a getter asking for a key not declared is a bug.
        self.known: tuple[_str, ...] = ()

    def key(self, name: Any) -> _str:
        return f"{self.prefix}.{name}" if self.prefix else _str(name)

    def _lookup(self, name: Any) -> tuple[_bool, Any]:
        if name not in self._asked:
            self._asked.append(name)
        if name in self.data:
            return True, self.data[name]
        return False, None

    def __contains__(self, name: object) -> _bool:
        return name in self.data

    def deprecated(self, name: _str, reason: _str) -> _bool:
        """Accept and drop ``name`` with a warning that names the key, the file and
        ``reason``; True when it was there."""
        present, _ = self._lookup(name)
        if present:
            where = f"{self.file}: " if self.file else ""
            log.warning("%s%s: deprecated and ignored (%s); remove it", where,
                        self.key(name), reason)
        return present

    def unknown(self) -> list[_str]:
        """The keys no getter asked for, sorted (for a reader that ignores unknown keys with
        a warning instead of refusing them with :meth:`finish`)."""
        return sorted(_str(k) for k in self.data if k not in self._asked)

    def finish(self) -> None:
        """Refuse any key no getter asked for, suggesting the closest one that is known."""
        if self.known:
            undeclared = [k for k in self._asked if k not in self.known]
            assert not undeclared, f"{self.prefix or 'top level'}: {undeclared} not in known"
        left = [k for k in self.data if k not in self._asked]
        if not left:
            return
        bad = sorted(left, key=_str)[0]
        known = list(dict.fromkeys([*self.known, *(k for k in self._asked if isinstance(k, _str))]))
        hit = difflib.get_close_matches(_str(bad), known, n=1)
        if hit:
            hint = f" (did you mean {hit[0]}?)"
        elif known:
            hint = f" (known: {', '.join(sorted(known))})"
        else:
            hint = ""
        raise self.error(bad, f"unknown key{hint}")


class Seq(_Node):
    """A reader over one list; the getters take an index (keys read ``prefix[i]``)."""

    def __init__(self, data: Any, prefix: _str = "", *, file: _str | None = None,
                 error: ErrorFactory = ConfigError, mapping: _str = "table") -> None:
        super().__init__(prefix, file, error, mapping)
        if not isinstance(data, (list, tuple)):
            raise self._error(f"expected an array, got {type_name(data, mapping)} "
                              f"{short_repr(data)}", key=prefix or None, file=file)
        self.data: list[Any] = list(data)

    def key(self, name: Any) -> _str:
        return f"{self.prefix}[{name}]"

    def _lookup(self, name: Any) -> tuple[_bool, Any]:
        if isinstance(name, _int) and 0 <= name < len(self.data):
            return True, self.data[name]
        return False, None

    def __len__(self) -> _int:
        return len(self.data)

    def tables(self) -> list[Table]:
        """Every item as a :class:`Table` (each must be a mapping)."""
        return [self.table(i) for i in range(len(self.data))]
