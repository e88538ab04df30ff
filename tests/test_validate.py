"""edgeml.validate: the one reader behind config, profile and manifest validation."""

from __future__ import annotations

import logging
import re

import pytest

from edgeml.errors import BundleFormatError, ConfigError, ProfileError
from edgeml.validate import REQUIRED, Seq, Table, short_repr, type_name

FILE = "/etc/edgeml/edgeml.toml"


def table(data, prefix="", **kw) -> Table:
    return Table(data, prefix, file=FILE, **kw)


def refused(fn, key: str, match: str, cls: type[Exception] = ConfigError) -> Exception:
    """``fn()`` raises ``cls`` naming ``key`` and the file, with ``match`` in the message."""
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    assert msg.startswith(f"{FILE}: {key}: "), msg
    assert re.search(match, msg), msg
    assert info.value.key == key and info.value.file == FILE
    return info.value


# --- the container ----------------------------------------------------------------------------
def test_table_refuses_a_non_mapping() -> None:
    refused(lambda: table([1], "broker"), "broker", r"expected a table, got array \[1\]")
    with pytest.raises(ConfigError) as info:
        table("x")
    assert info.value.key is None and str(info.value) == f"{FILE}: expected a table, got string 'x'"


def test_missing_default_and_required() -> None:
    t = table({})
    assert t.str("a", "dflt") == "dflt" and t.int("b", 3) == 3 and t.str("c", None) is None
    refused(lambda: t.str("name"), "name", r"missing \(required\)")
    refused(lambda: t.int("n", REQUIRED), "n", "missing")
    assert repr(REQUIRED) == "REQUIRED"


def test_null_counts_as_absent_only_for_optional_keys() -> None:
    t = table({"a": None, "b": None})
    assert t.int("a", None) is None
    refused(lambda: t.int("b", 5), "b", "expected an integer, got null None")


def test_defaults_are_not_validated() -> None:
    assert table({}).int("n", -1, min=0) == -1  # the caller's default is trusted


# --- str ----------------------------------------------------------------------------------
def test_str() -> None:
    t = table({"a": "x", "b": 5, "c": "", "d": "../evil", "e": "ok-1"})
    assert t.str("a") == "x"
    refused(lambda: t.str("b"), "b", "expected a string, got integer 5")
    refused(lambda: t.str("c", nonempty=True), "c", "must not be empty")
    name = re.compile(r"[a-z0-9-]+")
    refused(lambda: t.str("d", pattern=name, what="a name"), "d", "'../evil' is not a name")
    assert t.str("e", pattern=name) == "ok-1"
    t.finish()


def test_long_values_are_cut_short_in_messages() -> None:
    err = refused(lambda: table({"a": "x" * 10_000}).int("a"), "a", r"expected an integer")
    assert len(str(err)) < 200 and str(err).endswith("...")
    assert short_repr("abc") == "'abc'" and len(short_repr(list(range(1000)))) == 60


# --- int: never a bool --------------------------------------------------------------------
def test_int_accepts_and_checks_range() -> None:
    t = table({"a": 3, "b": 0, "c": 11, "d": 1})
    assert t.int("a", min=1, max=10) == 3
    refused(lambda: t.int("b", min=1), "b", r"0 is out of range \(expected >= 1\)")
    refused(lambda: t.int("c", max=10), "c", r"11 is out of range \(expected <= 10\)")
    refused(lambda: table({"d": 0}).int("d", min=1, max=10), "d", r"expected 1\.\.10\)")
    assert t.int("d", min=1, max=1) == 1


@pytest.mark.parametrize("value, got", [
    (True, "boolean True"), (False, "boolean False"), (2.0, "float 2.0"), ("2", "string '2'"),
    ([2], r"array \[2\]"), ({"a": 1}, r"table \{'a': 1\}"),
])
def test_int_refuses_bool_and_other_types(value, got: str) -> None:
    refused(lambda: table({"n": value}).int("n"), "n", f"expected an integer, got {got}")


# --- number -------------------------------------------------------------------------------
def test_number_accepts_int_and_float_as_float() -> None:
    t = table({"a": 2, "b": 2.5})
    a, b = t.number("a"), t.number("b")
    assert (a, b) == (2.0, 2.5) and isinstance(a, float)


@pytest.mark.parametrize("value, kw, match", [
    (True, {}, "expected a number, got boolean True"),
    ("1", {}, "expected a number, got string '1'"),
    (float("nan"), {}, "must be a finite number, got nan"),
    (float("inf"), {}, "must be a finite number, got inf"),
    (0, {"min": 0, "min_open": True}, r"0 is out of range \(expected > 0\)"),
    (-0.5, {"min": 0}, r"-0\.5 is out of range \(expected >= 0\)"),
    (1.5, {"min": 0, "max": 1}, r"1\.5 is out of range \(expected 0\.\.1\)"),
    (1, {"max": 1, "max_open": True}, r"expected < 1\)"),
    (0, {"min": 0, "max": 10, "min_open": True}, r"expected > 0 and <= 10\)"),
])
def test_number_refuses(value, kw: dict, match: str) -> None:
    refused(lambda: table({"x": value}).number("x", **kw), "x", match)


def test_number_bounds_are_inclusive_unless_open() -> None:
    t = table({"a": 0, "b": 1, "c": float("inf")})
    assert t.number("a", min=0) == 0.0 and t.number("b", max=1) == 1.0
    assert t.number("c", finite=False) == float("inf")


# --- bool, choice, typed, value -----------------------------------------------------------
def test_bool() -> None:
    t = table({"a": True, "b": 1, "c": "yes"})
    assert t.bool("a") is True and t.bool("z", False) is False
    refused(lambda: t.bool("b"), "b", "expected true or false, got integer 1")
    refused(lambda: t.bool("c"), "c", "expected true or false, got string 'yes'")


def test_choice() -> None:
    t = table({"a": "vote", "b": "best", "c": 3})
    assert t.choice("a", ("champion", "vote")) == "vote"
    assert t.choice("z", ("champion", "vote"), "champion") == "champion"
    refused(lambda: t.choice("b", ("champion", "vote")), "b",
            "'best' is not one of champion, vote")
    refused(lambda: t.choice("c", ("champion", "vote")), "c",
            "expected one of champion, vote, got integer 3")


def test_typed_and_value() -> None:
    t = table({"v": 3, "w": "3", "x": True, "y": 2.5, "raw": object})
    assert t.typed("v", (str, int)) == 3 and t.typed("w", (str, int)) == "3"
    refused(lambda: t.typed("x", (str, int), what="a string or integer"), "x",
            "expected a string or integer, got boolean True")
    refused(lambda: t.typed("y", (str, int), what="a version"), "y",
            "expected a version, got float 2.5")
    assert table({"b": False}).typed("b", (bool, int)) is False
    assert t.value("raw") is object and t.value("none", 7) == 7


# --- lists --------------------------------------------------------------------------------
def test_list_of_str() -> None:
    t = table({"a": ["x", "y"], "e": [], "n": ["x", 1], "b": ["x", ""], "d": ["x", "x"],
               "p": ["ok", "NO"], "s": "x"})
    assert t.list_of_str("a") == ("x", "y")
    assert t.list_of_str("e") == () and t.list_of_str("z", ()) == ()
    assert t.list_of_str("none", None) is None
    refused(lambda: t.list_of_str("e", nonempty=True), "e", "must not be empty")
    refused(lambda: t.list_of_str("n"), r"n[1]", "expected a string, got integer 1")
    refused(lambda: t.list_of_str("b"), r"b[1]", "must not be empty")
    refused(lambda: t.list_of_str("d", unique=True), r"d[1]", "'x' is listed twice")
    refused(lambda: t.list_of_str("p", pattern=re.compile("[a-z]+"), what="lower"), r"p[1]",
            "'NO' is not lower")
    refused(lambda: t.list_of_str("s"), "s", "expected an array, got string 'x'")


def test_seq_items_are_named_by_index() -> None:
    s = table({"rows": [[1, 2.5], [None, "x"]]}, "self_test").seq("rows")
    assert isinstance(s, Seq) and len(s) == 2 and s.key(1) == "self_test.rows[1]"
    first = s.seq(0)
    assert [first.number(j) for j in range(len(first))] == [1.0, 2.5]
    second = s.seq(1)
    assert second.int(0, None) is None  # null item where optional
    refused(lambda: second.number(1), "self_test.rows[1][1]", "expected a number, got string")
    refused(lambda: s.int(5), "self_test.rows[5]", "missing")
    refused(lambda: Seq({"a": 1}, "x", file=FILE), "x", "expected an array, got table")


# --- nested tables: prefixes --------------------------------------------------------------
def test_nested_table_prefixes() -> None:
    doc = {"pipelines": [{"name": "p", "window": {"size": 0}, "models": [{"role": 5}]}]}
    root = table(doc)
    pipe = root.seq("pipelines").tables()[0]
    assert pipe.prefix == "pipelines[0]" and pipe.key("name") == "pipelines[0].name"
    refused(lambda: pipe.table("window").int("size", min=1), "pipelines[0].window.size",
            r"0 is out of range")
    model = pipe.seq("models").tables()[0]
    refused(lambda: model.str("role"), "pipelines[0].models[0].role",
            "expected a string, got integer 5")
    refused(lambda: table({"w": 3}).table("w"), "w", "expected a table, got integer 3")
    refused(lambda: table({"m": [1]}).seq("m").tables(), "m[0]", "expected a table")


def test_missing_table_gives_its_default_as_a_table() -> None:
    t = table({})
    sub = t.table("deploy", {})
    assert isinstance(sub, Table) and sub.prefix == "deploy" and sub.int("keep", 3) == 3
    sub.finish()
    assert t.table("upstream", None) is None and t.seq("pipelines", None) is None
    refused(lambda: t.table("broker"), "broker", "missing")


def test_mapping_returns_a_plain_dict() -> None:
    t = table({"o": {"batching": {"max_batch": 8}}, "bad": {1: "x"}})
    assert t.mapping("o") == {"batching": {"max_batch": 8}} and t.mapping("z", {}) == {}
    refused(lambda: t.mapping("bad"), "bad", "key 1 is not a string")
    t.finish()  # a mapping is read whole: its keys are not "unknown"


# --- unknown keys -------------------------------------------------------------------------
def test_unknown_key_suggests_the_closest_known_one() -> None:
    t = table({"deadline": 5, "policy": "x"}, "pipelines[0]")
    t.number("deadline_ms", 50.0)
    t.str("policy")
    refused(t.finish, "pipelines[0].deadline", r"unknown key \(did you mean deadline_ms\?\)")


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    t = table({"zzz": 1, "a": 1})
    t.int("a")
    t.int("b", 0)
    refused(t.finish, "zzz", r"unknown key \(known: a, b\)$")
    bare = table({"q": 1})
    refused(bare.finish, "q", "unknown key$")


def test_unknown_keys_reported_in_sorted_order_and_finish_is_quiet_when_all_read() -> None:
    t = table({"b": 1, "a": 1})
    refused(t.finish, "a", "unknown key")
    ok = table({"a": 1})
    ok.int("a")
    ok.finish()
    assert "a" in ok and "b" not in ok
    assert ok.int("a") == 1  # reading again gives the same value


def test_deprecated_key_is_dropped_with_a_warning(caplog) -> None:
    t = table({"batching": {"scoring_threads": 4, "max_batch": 8}})
    b = t.table("batching")
    with caplog.at_level(logging.WARNING, logger="edgeml.validate"):
        assert b.deprecated("scoring_threads", "no longer used") is True
        assert b.deprecated("other", "x") is False
    assert b.int("max_batch") == 8
    b.finish()  # not an unknown key
    assert caplog.messages == [
        f"{FILE}: batching.scoring_threads: deprecated and ignored (no longer used); remove it"
    ]


# --- error factories ----------------------------------------------------------------------
def test_error_class_follows_the_factory() -> None:
    refused(lambda: table({"n": True}).int("n"), "n", "boolean", ConfigError)
    err = refused(lambda: table({"n": True}, error=ProfileError).int("n"), "n", "boolean",
                  ProfileError)
    assert err.kind == "profile"

    def manifest_error(message: str, *, key: str | None, file: str | None) -> Exception:
        return BundleFormatError(f"manifest key {key!r}: {message}" if key
                                 else f"manifest: {message}")

    t = Table({"model": {"size": "12"}}, error=manifest_error, mapping="object")
    with pytest.raises(BundleFormatError,
                       match=r"^manifest key 'model\.size': expected an integer, got string '12'$"):
        t.table("model").int("size")
    with pytest.raises(BundleFormatError, match=r"^manifest: expected an object, got array"):
        Table([], error=manifest_error, mapping="object")
    t2 = Table({"provenance": []}, error=manifest_error, mapping="object")
    with pytest.raises(BundleFormatError, match="'provenance': expected an object, got array"):
        t2.mapping("provenance")
    assert t2.error(None, "x").args == ("manifest: x",)


def test_error_without_a_file() -> None:
    with pytest.raises(ConfigError) as info:
        Table({"n": "x"}, "sync").int("n")
    assert str(info.value) == "sync.n: expected an integer, got string 'x'"
    assert info.value.file is None


def test_type_name() -> None:
    assert [type_name(v) for v in (None, True, 1, 1.0, "s", [], {}, b"")] == [
        "null", "boolean", "integer", "float", "string", "array", "table", "bytes"]
    assert type_name({}, "object") == "object"


def test_declared_known_keys_feed_suggestions_and_catch_undeclared_getters() -> None:
    t = table({"windo": 3})
    t.known = ("window", "policy")
    t.str("policy", "champion")  # declared, read
    refused(t.finish, "windo", r"did you mean window\?")  # declared, never read
    bug = table({})
    bug.known = ("a",)
    bug.int("b", 0)
    with pytest.raises(AssertionError, match=r"\['b'\] not in known"):
        bug.finish()
