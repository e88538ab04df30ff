"""The pure parts of a staged rollout: waves, holds, thresholds, judgement, evidence from
records, and the state tables (SQLite file: the state must survive a new connection)."""

from __future__ import annotations

import pytest

from edgeml.errors import RolloutError
from edgeml.host.rollout.db import Database
from edgeml.host.rollout.evidence import evidence, row_counts
from edgeml.host.rollout.plan import (
    Evidence,
    Figures,
    Hold,
    Thresholds,
    WaveSpec,
    judge,
    next_wave,
    parse_hold,
    parse_share,
    parse_waves,
    wave_order,
)
from edgeml.host.rollout.runner import would_replace
from edgeml.host.rollout.store import DeviceState, RolloutStore, Wave


# ---- waves ----------------------------------------------------------------------------------
def test_parse_waves_counts_and_shares_and_a_final_100_percent():
    assert parse_waves("1,10%,50%,100%") == (WaveSpec(count=1), WaveSpec(percent=10.0),
                                             WaveSpec(percent=50.0), WaveSpec(percent=100.0))
    assert parse_waves("2, 25%") == (WaveSpec(count=2), WaveSpec(percent=25.0),
                                     WaveSpec(percent=100.0))
    for bad in ("", "0", "0%", "150%", "ten", "5x"):
        with pytest.raises(RolloutError, match="--waves"):
            parse_waves(bad)


def test_wave_targets_are_cumulative_and_capped():
    assert WaveSpec(count=1).target(3) == 1
    assert WaveSpec(count=5).target(3) == 3
    assert WaveSpec(percent=10.0).target(3) == 1    # ceil: never zero devices
    assert WaveSpec(percent=50.0).target(3) == 2
    assert WaveSpec(percent=100.0).target(3) == 3
    assert WaveSpec(percent=10.0).target(100) == 10


def test_next_wave_adds_up_to_the_target_from_the_stable_order():
    online = ["d1", "d2", "d3", "d4"]
    order = wave_order("r1", online)
    assert sorted(order) == online and wave_order("r1", reversed(online)) == order
    assert wave_order("r2", online) != order or wave_order("r3", online) != order
    first = next_wave("r1", WaveSpec(count=1), online, [])
    assert first == order[:1]
    assert next_wave("r1", WaveSpec(percent=10.0), online, first) == []  # 10% of 4 is 1
    half = next_wave("r1", WaveSpec(percent=50.0), online, first)
    assert half == order[1:2]
    rest = next_wave("r1", WaveSpec(percent=100.0), online, first + half)
    assert rest == order[2:]
    # a device of an earlier wave that went offline still counts as taken
    assert next_wave("r1", WaveSpec(percent=100.0), order[1:], order[:1]) == order[1:]


# ---- hold and shares ------------------------------------------------------------------------
def test_parse_hold():
    assert parse_hold("500rows") == Hold(rows=500)
    assert parse_hold("1 row") == Hold(rows=1)
    assert parse_hold("60s") == Hold(seconds=60.0)
    assert parse_hold("5m") == Hold(seconds=300.0)
    assert parse_hold("1h") == Hold(seconds=3600.0)
    for bad in ("0rows", "0s", "soon", "5 days"):
        with pytest.raises(RolloutError, match="--hold"):
            parse_hold(bad)


def test_parse_share():
    assert parse_share("5%", "--x") == pytest.approx(0.05)
    assert parse_share("0.2", "--x") == pytest.approx(0.2)
    for bad in ("2", "-1%", "lots"):
        with pytest.raises(RolloutError, match="--x"):
            parse_share(bad, "--x")


# ---- judgement ------------------------------------------------------------------------------
def _ev(**per: Figures) -> Evidence:
    total = Figures(rows=sum(f.rows for f in per.values()),
                    errors=sum(f.errors for f in per.values()),
                    compared=sum(f.compared for f in per.values()),
                    disagreed=sum(f.disagreed for f in per.values()),
                    p99_ms=max((f.p99_ms for f in per.values() if f.p99_ms is not None),
                               default=None),
                    latency_rows=sum(f.latency_rows for f in per.values()),
                    first_ts=min((f.first_ts for f in per.values() if f.first_ts), default=None),
                    last_ts=max((f.last_ts for f in per.values() if f.last_ts), default=None))
    return Evidence(total, per)


def test_judge_passes_when_every_threshold_holds():
    ev = _ev(a=Figures(rows=100, errors=0, compared=100, disagreed=5, p99_ms=2.0,
                       latency_rows=100))
    v = judge(ev, Thresholds(max_disagreement=0.1, max_error_rate=0.01, max_p99_ms=5.0), ["a"])
    assert v.passed and v.breaches == () and v.reason == "all held"


def test_judge_names_the_figure_and_the_devices_over_the_limit():
    ev = _ev(good=Figures(rows=100, compared=100, disagreed=2),
             bad=Figures(rows=100, compared=100, disagreed=80))
    v = judge(ev, Thresholds(max_disagreement=0.2), ["bad"])
    assert not v.passed
    (b,) = v.breaches
    assert b.figure == "disagreement" and b.devices == ("bad",)
    assert b.value == pytest.approx(82 / 200)
    assert "41.0%" in v.reason and "82 of 200" in v.reason and "bad" in v.reason


def test_judge_errors_latency_and_missing_evidence_fail_closed():
    ev = _ev(a=Figures(rows=10, errors=3, compared=0, p99_ms=None))
    v = judge(ev, Thresholds(max_disagreement=0.5, max_error_rate=0.1, max_p99_ms=10.0), ["a"])
    assert {b.figure for b in v.breaches} == {"error_rate", "disagreement", "p99_ms"}
    # a device of the wave with no rows at all is a breach of its own
    v = judge(_ev(a=Figures(rows=10)), Thresholds(), ["a", "b"])
    assert not v.passed and v.breaches[0].figure == "rows" and v.breaches[0].devices == ("b",)
    # unset thresholds are not judged
    assert judge(_ev(a=Figures(rows=1, errors=1)), Thresholds(), ["a"]).passed


# ---- evidence from the collector's database ------------------------------------------------
def _res(dev, seq, version, role, label, ts, **extra):
    rid = f"{dev}/p/{seq}/m/{version}/results"
    return {"record_id": rid, "id": seq, "pipeline": "p", "model": "m", "version": version,
            "role": role, "input_seq": seq, "ts": ts, "late": False,
            "output": None if label is None else {"label": label}, **extra}


def _store(url, dev, records):
    """Records into the fleet database the way the collector stores a synced batch."""
    import msgpack

    from edgeml.host.collect.sink import Incoming, Sink

    env = {"schema": 1, "device": dev, "stream": "results", "batch_seq": 1, "sent": 100.0,
           "records": records}
    with Sink(url) as sink:
        sink.store([Incoming(f"edgeml/{dev}/sync/results", msgpack.packb(env))])


def test_evidence_pairs_the_new_version_with_the_champion_per_device(tmp_path):
    from edgeml.host.collect.evidence import FleetDB

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    _store(url, "a", [
        _res("a", 1, "1", "champion", "x", 10.0),
        _res("a", 1, "2", "canary", "x", 10.0, latency_ms=1.0),
        _res("a", 2, "1", "champion", "x", 11.0),
        _res("a", 2, "2", "canary", "y", 11.0, latency_ms=3.0),
        _res("a", 3, "2", "canary", None, 12.0, error="boom"),
        _res("a", 0, "2", "canary", "y", 5.0),   # before it was active there: not counted
    ])
    _store(url, "b", [_res("b", 1, "2", "canary", "x", 10.0, latency_ms=2.0)])
    _store(url, "c", [_res("c", 1, "2", "canary", "x", 10.0)])  # not in the rollout
    with FleetDB(url) as db:
        ev = evidence(db, pipeline="p", model="m", version="2", since={"a": 9.0, "b": 9.0})
        assert row_counts(db, pipeline="p", model="m", version="2",
                          since={"a": 9.0, "b": 9.0}) == {"a": 3, "b": 1}
    a = ev.per_device["a"]
    assert (a.rows, a.errors, a.compared, a.disagreed) == (3, 1, 2, 1)
    assert a.latency_rows == 2 and a.p99_ms == pytest.approx(2.98)
    assert (a.first_ts, a.last_ts) == (10.0, 12.0)
    b = ev.per_device["b"]
    assert (b.rows, b.compared, b.disagreed) == (1, 0, 0)  # b's input 1 is not a's input 1
    assert set(ev.per_device) == {"a", "b"}
    t = ev.total
    assert (t.rows, t.errors, t.compared, t.disagreed) == (4, 1, 2, 1)
    assert t.disagreement == 0.5 and t.latency_rows == 3 and t.first_ts == 10.0


# ---- would an install push out another version? ---------------------------------------------
def test_would_replace_refuses_to_push_out_a_version_of_the_same_role():
    status = {"deploy": {"pipelines": {"activity": {"active": [
        {"model": "activity", "version": "1", "role": "champion"},
        {"model": "activity", "version": "2", "role": "canary"}]}}}}
    why = would_replace(status, None, "activity", "3", "canary")
    assert why and "activity 2 as canary" in why and "nothing was changed" in why
    assert would_replace(status, None, "activity", "3", "challenger") is None
    assert would_replace(status, "activity", "activity", "2", "canary") is None  # itself


# ---- state tables ---------------------------------------------------------------------------
def test_state_survives_a_new_connection(tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with Database(url) as db:
        store = RolloutStore(db)
        r = store.create(bundle_sha256="ab" * 32, bundle_path="b.edgeml", model="m",
                         version="2", group="g", role="canary", pipeline=None,
                         waves=["1", "100%"], hold="500rows",
                         thresholds=Thresholds(max_disagreement=0.1).as_dict())
        store.add_wave(Wave(r.id, 0, "1", "installing", ["d1"], 100.0))
        store.set_device(r.id, DeviceState("d1", 0, "active", active_at=101.5, pipeline="p"))
        w = store.waves(r.id)[0]
        w.state, w.active_at, w.verdict = "holding", 102.0, {"passed": None}
        store.save_wave(w)
        r.current_wave, r.pipeline = 0, "p"
        store.save(r)
    with Database(url) as db:
        store = RolloutStore(db)  # migrating again changes nothing
        (again,) = store.find_running(bundle_sha256="ab" * 32, group="g")
        assert again.id == r.id and again.pipeline == "p" and again.waves == ["1", "100%"]
        assert Thresholds.from_dict(again.thresholds).max_disagreement == 0.1
        (w,) = store.waves(r.id)
        assert (w.state, w.devices, w.active_at, w.verdict) == (
            "holding", ["d1"], 102.0, {"passed": None})
        d = store.devices(r.id)["d1"]
        assert (d.state, d.active_at, d.pipeline) == ("active", 101.5, "p")
        again.state = "halted"
        store.save(again)
        assert store.find_running(group="g") == []
        assert db.query("SELECT version FROM rollout_schema") == [(1,)]


def test_a_newer_schema_is_refused(tmp_path):
    with Database(f"sqlite:///{tmp_path / 'fleet.db'}") as db:
        RolloutStore(db)
        db.execute("UPDATE rollout_schema SET version = 99")
        db.commit()
        with pytest.raises(RolloutError, match="newer"):
            RolloutStore(db)


def test_state_and_evidence_on_postgresql(postgres):
    """The same tables and queries on a private PostgreSQL (the collector's schema beside)."""
    from edgeml.host.collect.evidence import FleetDB

    url = postgres.create_database("rollout_state")
    _store(url, "a", [_res("a", 1, "1", "champion", "x", 10.0),
                      _res("a", 1, "2", "canary", "y", 10.0, latency_ms=4.0)])
    with FleetDB(url) as fdb:
        ev = evidence(fdb, pipeline="p", model="m", version="2", since={"a": 9.0})
    assert (ev.total.rows, ev.total.compared, ev.total.disagreed) == (1, 1, 1)
    assert ev.total.p99_ms == 4.0 and ev.total.first_ts == 10.0
    with Database(url) as db:
        assert db.has_table("records") and not db.has_table("nothing_here")
        store = RolloutStore(db)
        r = store.create(bundle_sha256="cd" * 32, bundle_path=None, model="m", version="2",
                         group="g", role="canary", pipeline="p", waves=["100%"],
                         hold="10s", thresholds={})
        store.add_wave(Wave(r.id, 0, "100%", "holding", ["a"], 1.5, active_at=2.5))
        store.set_device(r.id, DeviceState("a", 0, "active", active_at=9.0, pipeline="p"))
        store.set_device(r.id, DeviceState("a", 0, "rolled_back", active_at=9.0, pipeline="p"))
    with Database(url) as db:
        store = RolloutStore(db)
        (again,) = store.find_running(group="g")
        assert again.id == r.id and store.waves(r.id)[0].active_at == 2.5
        assert store.devices(r.id)["a"].state == "rolled_back"


def test_explain_names_breaching_devices_first_and_caps_the_list():
    from edgeml.host.rollout.runner import MAX_DEVICE_LINES, explain

    per = {f"d{i:02d}": Figures(rows=10, compared=10, disagreed=0, first_ts=1.0, last_ts=2.0)
           for i in range(30)}
    per["d29"] = Figures(rows=10, compared=10, disagreed=9, first_ts=1.0, last_ts=2.0)
    v = judge(_ev(**per), Thresholds(max_disagreement=0.02), ["d28"])
    lines = explain(v, ["d28"])
    assert lines[0].startswith("HALT: disagreement with the champion") and "on d29" in lines[0]
    assert "300 result rows" in lines[1] and "1970-01-01 00:00:01.000Z" in lines[1]
    assert lines[2].startswith("  d28 (this wave): 10 rows") and lines[3].startswith("  d29: ")
    assert len(lines) == 2 + MAX_DEVICE_LINES + 1 and "10 more device(s)" in lines[-1]


def test_cli_refuses_a_missing_database_and_bad_flags(tmp_path, capsys):
    from edgeml.cli import main

    assert main(["rollout", "--list", "--db", f"sqlite:///{tmp_path / 'none.db'}"]) == 1
    assert "no fleet database at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["rollout", "--db", db]) == 1
    assert "give BUNDLE and --group" in capsys.readouterr().err
    assert main(["rollout", "x.edgeml", "--group", "g", "--db", db,
                 "--max-disagreement", "150%"]) == 1
    assert "--max-disagreement" in capsys.readouterr().err


# ---- the runner's install step against a scripted fleet (no broker) -------------------------
class ScriptedFleet:
    """Answers statuses and pushes from a script: ``reports[device]`` is the final deploy
    report a push gets; records what was pushed and commanded."""

    def __init__(self, devices, reports):
        self.docs = {d: {"state": "online", "deploy": {"groups": ["g"], "pipelines": {
            "p": {"active": [{"model": "m", "version": "1", "role": "champion"}]}}}}
            for d in devices}
        self.reports = reports
        self.pushed: list[str] = []
        self.commands: list[tuple] = []

    async def statuses(self):
        return self.docs

    async def push(self, data, *, device, **kw):
        from types import SimpleNamespace

        self.pushed.append(device)
        return SimpleNamespace(final={device: self.reports[device]})

    async def command(self, device, cmd, **kw):
        self.commands.append((device, cmd, kw["model"], kw["version"]))
        return {"ok": True, "message": f"retired {kw['model']}:{kw['version']}"}


def _runner(tmp_path, fleet, bundle):
    from edgeml.host.collect.sink import Sink
    from edgeml.host.rollout.runner import RolloutRunner, RolloutSettings

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    Sink(url).close()  # the collector's schema, no records
    db = Database(url)
    settings = RolloutSettings(bundle=bundle, group="g", waves="1,100%", hold="1rows",
                               hold_timeout_s=0.2, poll_s=0.05)
    return RolloutRunner(settings, fleet, db), db


def test_an_install_interrupted_by_a_restart_counts_already_active_as_installed(
        tmp_path, activity_bundle):
    import asyncio

    from edgeml.host.rollout.store import RolloutStore

    fleet = ScriptedFleet(["a", "b"], {})
    runner, db = _runner(tmp_path, fleet, activity_bundle)
    r, resumed = runner.open()
    assert not resumed
    store = RolloutStore(db)
    order = wave_order(r.id, ["a", "b"])
    store.add_wave(Wave(r.id, 0, "1", "installing", order[:1], 1.0))
    store.set_device(r.id, DeviceState(order[0], 0, "installing"))
    fleet.reports[order[0]] = {"stage": "noop", "pipeline": "p",
                               "reason": "activity 1 is already active in pipeline p as canary"}
    fleet.reports[order[1]] = {"stage": "noop", "reason": "activity 1 was deployed to "
                               "pipeline p before (not active now: ... push with --force)"}
    # the wave was installing when the tool stopped: a new run installs it again
    r = asyncio.run(runner.run())
    devices = store.devices(r.id)
    assert devices[order[0]].state == "rolled_back"  # installed, then judged (no evidence)
    assert r.state == "halted" and "no evidence" in r.reason
    assert fleet.pushed == [order[0]]
    assert fleet.commands == [(order[0], "retire", "activity", "1")]
    db.close()


def test_a_device_refusal_halts_with_its_reason(tmp_path, activity_bundle):
    import asyncio

    fleet = ScriptedFleet(["a"], {"a": {
        "stage": "failed", "reason": "capacity: pipeline p would have 3 active versions, over "
                                     "the firmware profile's models.max_active_versions = 2; "
                                     "retire one first (nothing was evicted)"}})
    runner, db = _runner(tmp_path, fleet, activity_bundle)
    r = asyncio.run(runner.run())
    assert r.state == "halted"
    assert r.reason == ("wave 1 (1): a refused the install (failed: capacity: pipeline p "
                        "would have 3 active versions, over the firmware profile's "
                        "models.max_active_versions = 2; retire one first (nothing was "
                        "evicted))")
    assert fleet.commands == []  # nothing was installed, nothing to roll back
    db.close()


def test_an_unreadable_evidence_table_stops_the_run_but_keeps_the_rollout(tmp_path,
                                                                         activity_bundle):
    import asyncio

    from edgeml.host.rollout.runner import RolloutRunner, RolloutSettings

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with Database(url) as db:  # a records table without the collector's columns
        db.execute("CREATE TABLE records (record_id TEXT, device TEXT, stream TEXT, "
                   "pipeline TEXT, model TEXT, version TEXT, ts REAL, record TEXT)")
        db.commit()
        fleet = ScriptedFleet(["a"], {"a": {"stage": "active", "ts": 1.0, "pipeline": "p"}})
        settings = RolloutSettings(bundle=activity_bundle, group="g", waves="100%",
                                   hold="5rows", poll_s=0.05, hold_timeout_s=0.3)
        with pytest.raises(RolloutError, match=r"cannot read the evidence .* stays running"):
            asyncio.run(RolloutRunner(settings, fleet, db).run())
        (r,) = RolloutStore(db).find_running(group="g")
        assert RolloutStore(db).devices(r.id)["a"].state == "active"
