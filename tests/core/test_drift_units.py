"""The drift watch's pure parts: PSI/KS figures, the k-in-a-row gate, rate drops, output
drift, bounded sources."""

from __future__ import annotations

import numpy as np

from edgeml.config import DriftConfig
from edgeml.core.drift import DriftMonitor, ks_binned, make_reference, psi
from edgeml.core.health import AlertGate, RateTracker


def test_psi_and_ks_basics():
    e = np.full(10, 0.1)
    assert psi(e, e) == 0.0 and ks_binned(e, e) == 0.0
    a = np.r_[np.full(5, 0.2), np.zeros(5)]
    assert psi(e, a) > 1.0 and abs(ks_binned(e, a) - 0.5) < 1e-9


def test_small_sample_bias_is_about_bins_minus_one_over_n():
    rng = np.random.default_rng(0)
    ref = make_reference(rng.normal(size=(200_000, 1)), ["x"], None, kind="regressor")
    from edgeml.core.drift import compare_inputs
    for n in (1000, 2000):
        vals = [compare_inputs(ref, rng.normal(size=(n, 1)), ["x"], None)["x"]["psi"]
                for _ in range(200)]
        assert abs(np.mean(vals) - 9 / n) < 0.35 * 9 / n  # iid: E[PSI] ~ (bins - 1) / n


def test_gate_needs_k_in_a_row_both_ways():
    g = AlertGate(2)
    assert [g.update(b) for b in (True, False, True, True, True, False, True, False, False)] \
        == [None, None, None, "raised", None, None, None, None, "cleared"]


def test_rate_tracker_flags_a_drop_after_warmup_and_bounds_sources():
    r = RateTracker(0.5, max_sources=2, k=2)
    t = 0.0
    r.tick(t)
    out = []
    for i in range(8):
        for src in ("a", "b", "c"):
            r.add(src, 100 if (src == "b" or i < 5) else 10)
        t += 10
        out.append(r.tick(t))
    assert r.untracked == 8 * 100 - 3 * 90  # "c" is never tracked
    bad_a = [[bad for s, bad, _ in o if s == "a"] for o in out]
    assert bad_a[4:] == [[False], [True], [True], [True]]
    assert all(not bad for o in out for s, bad, _ in o if s == "b")


def _monitor(ref, alerts, **cfg):
    # windows by count alone here (min_window_s 0); the time floor has tests of its own
    m = DriftMonitor("p", DriftConfig(**{"window": 1000, "min_window_s": 0, **cfg}),
                     features=["x", "y"],
                     window=None, hop=None, record=lambda d: None, clock=lambda: 0.0,
                     alert=lambda k, d: alerts.append((k, d["state"], d)))
    m.set_reference(ref, "m:1")
    return m


def test_rate_drop_raised_and_cleared_through_the_monitor():
    rng = np.random.default_rng(1)
    ref = make_reference(rng.normal(size=(5000, 2)), ["x", "y"], None, kind="regressor")
    alerts: list = []
    m = _monitor(ref, alerts, consecutive=2)
    t = 0.0
    m.tick(t)
    for rate in [50] * 5 + [5] * 3 + [50] * 3:
        m.observe_rows(["s/1"] * rate, rng.normal(size=(rate, 2)))
        t += 1.0
        m.tick(t)
    assert [(k, s) for k, s, _ in alerts if k == "rate_drop"] == \
        [("rate_drop", "raised"), ("rate_drop", "cleared")]
    raised = next(d for k, s, d in alerts if k == "rate_drop")
    assert raised["source"] == "s/1" and raised["rate"] == 5.0 and raised["baseline"] > 40


def test_output_drift_per_version():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(4000, 2))
    lab = (X[:, 0] > 0).astype(int)
    ref = make_reference(X, ["x", "y"], None, kind="anomaly", labels=lab,
                         scores=X[:, :1])
    alerts: list = []
    m = _monitor(ref, alerts, output_window=200)
    m.set_versions({"m:1": (ref, "anomaly")})
    for _ in range(3):  # same distribution
        x = rng.normal(size=(200, 2))
        m.observe_outputs("m:1", (x[:, 0] > 0).astype(int).tolist(), x[:, :1])
    assert alerts == [] and m.output_current["m:1"]["label_psi"] < 0.1
    for _ in range(2):  # the model now says "1" nearly always
        x = rng.normal(loc=2.0, size=(200, 2))
        m.observe_outputs("m:1", (x[:, 0] > 0).astype(int).tolist(), x[:, :1])
    assert [(k, s) for k, s, _ in alerts] == [("output_drift", "raised")]
    assert alerts[0][2]["version"] == "1" and alerts[0][2]["score_psi"] > 0.25


def test_stuck_sources_are_bounded():
    rng = np.random.default_rng(3)
    ref = make_reference(rng.normal(size=(5000, 2)), ["x", "y"], None, kind="regressor")
    alerts: list = []
    m = _monitor(ref, alerts, max_sources=4, consecutive=1)
    topics = [f"s/{i}" for i in range(10)]
    for _ in range(2):
        x = rng.normal(size=(1000, 2))
        x[:, 1] = 7.0  # every source's y is stuck
        m.observe_rows([topics[i % 10] for i in range(1000)], x)
    stuck = {d["source"] for k, s, d in alerts if k == "sensor_stuck" and s == "raised"}
    assert len(stuck) == 4 and m.current["sources_untracked"] > 0


def test_a_fault_in_the_watch_never_reaches_scoring():
    ref = make_reference(np.zeros((10, 2)) + np.arange(10)[:, None], ["x", "y"], None,
                         kind="regressor")
    alerts: list = []
    m = _monitor(ref, alerts)
    m.on_batch([object()], np.zeros((1, 2)), ())  # rows without a topic: counted, not raised
    assert m.errors == 1
    m.set_versions({"m:1": (ref | {"outputs": {"score": {"edges": [], "freq": [1.0],
                                                           "min": 0, "max": 0}}},
                            "regressor")})
    m.on_outcomes([object()])
    assert m.errors == 2


def test_wrong_shaped_training_data_gives_no_reference_not_a_failure(caplog):
    from converters.reference import build_reference

    assert build_reference(None, None, np.zeros((5, 7)), ["a", "b"], None) is None
    assert "no drift reference" in caplog.text


def test_without_a_reference_a_stuck_channel_still_raises_and_clears():
    alerts: list = []
    m = DriftMonitor("p", DriftConfig(window=1000, consecutive=1, min_window_s=0),
                     features=["x", "y"],
                     window=None, hop=None, record=lambda d: None, clock=lambda: 0.0,
                     alert=lambda k, d: alerts.append((k, d["state"])))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 2))
    x[:, 0] = 1.0
    m.observe_rows(["s"] * 1000, x)
    m.observe_rows(["s"] * 1000, rng.normal(size=(1000, 2)))
    assert alerts == [("sensor_stuck", "raised"), ("sensor_stuck", "cleared")]


def test_status_says_whether_the_watch_is_on():
    def mon(enabled: bool) -> DriftMonitor:
        return DriftMonitor("p", DriftConfig(enabled=enabled), features=["x"], window=None,
                            hop=None, alert=lambda k, d: None, record=lambda d: None,
                            clock=lambda: 0.0)
    assert mon(True).status()["enabled"] is True
    assert mon(False).status()["enabled"] is False


def test_output_windows_count_the_same_fed_row_by_row_or_at_once():
    """Buffered outputs are binned in one pass (one-row batches are not scored one by one);
    the counts are those of the same rows in one batch, for every output kind and shape."""
    from edgeml.core.drift import OUTPUT_FLUSH, _OutputWindow, profile_outputs
    from edgeml.host.datasets import load_basicmotions

    data = load_basicmotions("TEST")
    classes = sorted(set(data.y))
    rng = np.random.default_rng(3)
    n = OUTPUT_FLUSH * 2 + 7
    probs = rng.dirichlet(np.ones(len(classes)), n).astype(np.float32)
    labels = [classes[i] for i in probs.argmax(1)]
    labels[5] = "never-seen"  # counted in the "other" bin
    anomaly = rng.normal(size=(n, 1)).astype(np.float32)
    cases = [("classifier", labels, probs), ("anomaly", [1] * n, anomaly),
             ("anomaly", [1] * n, anomaly[:, 0]),  # 1-D scores
             ("regressor", rng.normal(size=n).tolist(), None)]
    for kind, labs, scores in cases:
        ref = profile_outputs(kind, labs, scores if scores is not None else np.asarray(labs))
        whole, rows = _OutputWindow(ref, kind), _OutputWindow(ref, kind)
        whole.add(labs, scores)
        for i in range(n):
            rows.add(labs[i:i + 1], None if scores is None else scores[i:i + 1])
        assert whole.figures() == rows.figures()
        assert np.array_equal(whole.label_counts, rows.label_counts)
        assert np.array_equal(whole.score_counts, rows.score_counts)
        assert rows.score_counts.sum() == n or whole.score is None
    # scores whose width changes between batches are still counted, one batch at a time
    ref = profile_outputs("classifier", labels, probs)
    mixed = _OutputWindow(ref, "classifier")
    mixed.add(labels[:3], probs[:3])
    mixed.add(labels[3:4], probs[3, :2].reshape(1, 2))
    mixed.add([["a", "b"]], probs[4:5])  # a list label is counted as "other"
    mixed.figures()
    assert mixed.score_counts.sum() == 5 and mixed.label_counts.sum() == 5
    assert mixed.label_counts[-1] >= 1


def test_versions_bin_their_outputs_at_different_rows_with_the_same_figures():
    """The versions of one pipeline see the same rows; fed one row at a time their buffered
    outputs are binned at different rows (never all in one batch), and each window's
    figures are those of the same rows binned at once."""
    from edgeml.core.drift import OUTPUT_FLUSH

    rng = np.random.default_rng(4)
    X = rng.normal(size=(4000, 2))
    ref = make_reference(X, ["x", "y"], None, kind="anomaly",
                         labels=(X[:, 0] > 0).astype(int), scores=X[:, :1])
    alerts: list = []
    keys = ("m:1", "m:2", "m:3")
    n = 3 * OUTPUT_FLUSH
    m = _monitor(ref, alerts, output_window=n)
    m.set_versions({k: (ref, "anomaly") for k in keys})
    one = _monitor(ref, alerts, output_window=n)
    one.set_versions({"m:1": (ref, "anomaly")})
    x = rng.normal(size=(n - 1, 2))
    binned_at: dict[str, list[int]] = {k: [] for k in keys}
    for i in range(n - 1):
        for k in keys:
            m.observe_outputs(k, [int(x[i, 0] > 0)], x[i:i + 1, :1])
            if not m.outputs[k]._ps:
                binned_at[k].append(i)
    assert all(binned_at.values())
    for a in keys:
        for b in keys:
            assert a == b or not set(binned_at[a]) & set(binned_at[b])
    one.observe_outputs("m:1", (x[:, 0] > 0).astype(int).tolist(), x[:, :1])
    for k in keys:
        w = m.outputs[k]
        assert w.figures() == one.outputs["m:1"].figures()
        assert w.n == n - 1


def test_a_flush_counts_each_channel_as_binning_it_alone_does():
    """The live window's bin counts and out-of-range tallies, fed in one flush, are what
    binning each channel on its own gives (searchsorted, side=right), on real Daphnet
    samples against a reference from other samples, values on the edges included."""
    from edgeml.core.drift import bin_index
    from edgeml.host.datasets import DAPHNET_CHANNELS, load_daphnet

    X = np.asarray(load_daphnet().X, dtype=np.float32)
    feats = list(DAPHNET_CHANNELS)
    ref = make_reference(X[:3000], feats, None, kind="regressor")
    ref["inputs"].pop(feats[4])  # a channel without a reference is skipped
    m = DriftMonitor("p", DriftConfig(window=100_000), features=feats, window=None, hop=None,
                     record=lambda d: None, clock=lambda: 0.0, alert=lambda k, d: None)
    m.set_reference(ref, "m:1")
    live = X[5000:7000].copy()
    cols = m._cols
    live[:5, 0] = cols[0].edges[:5]  # values exactly on edges fall in the bin above
    m.observe_rows(["sensors/a"] * len(live), live)
    m._flush()
    for i, c in enumerate(cols):
        if c is None:
            assert not m._counts[i].any()
            continue
        want = np.bincount(bin_index(c.edges, live[:, i]), minlength=len(c.freq))
        assert m._counts[i].tolist() == want.tolist(), feats[i]
        assert m._oor[i] == np.count_nonzero((live[:, i] < c.lo) | (live[:, i] > c.hi))
    assert sum(int(m._counts[i].sum()) for i, c in enumerate(cols) if c) == 8 * len(live)


class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_flood_grows_windows_to_min_window_s_instead_of_closing_them_by_the_hundred():
    """At a flood's rate ``window`` samples come in milliseconds: each window also lasts
    ``min_window_s``, so the records upstream (and the alerts' pace) stay bounded by time
    while every sample is still counted. Wall-clock jumps do not move the ages."""
    rng = np.random.default_rng(7)
    train = rng.normal(size=(5000, 2))
    ref = make_reference(train, ["x", "y"], None, kind="classifier",
                         labels=(train[:, 0] > 0).astype(int))
    clock, records = _Clock(), []
    wall = iter(range(10**6))
    m = DriftMonitor("p", DriftConfig(window=1000, output_window=100, min_window_s=1.0),
                     features=["x", "y"], window=None, hop=None, record=records.append,
                     clock=lambda: float(next(wall)) * -1e6,  # a wall clock gone mad
                     monotonic=clock, alert=lambda k, d: None)
    m.set_reference(ref, "m:1")
    m.set_versions({"m:1": (ref, "classifier")})
    for step in range(25):  # 2.5 s of a flood: 25 batches of 1,000 rows, 0.1 s apart
        clock.t = 100.0 + step / 10
        x = rng.normal(size=(1000, 2))
        m.observe_rows(["s"] * 1000, x)
        m.observe_outputs("m:1", (x[:, 0] > 0).astype(int).tolist(), None)
    inputs = [r for r in records if r["kind"] == "input"]
    outputs = [r for r in records if r["kind"] == "output"]
    # count alone: 25 input and 250 output windows; by time: one of each per second
    assert len(inputs) == 2 and len(outputs) == 2
    assert all(r["samples"] >= 10_000 for r in inputs)  # every sample counted, none lost
    assert all(r["rows"] >= 10_000 for r in outputs)
    assert sum(r["samples"] for r in inputs) + m.status()["window_fill"] == 25_000
    assert all(r["psi"]["x"] < 0.1 for r in inputs)  # larger windows: figures as good


def test_a_full_window_closes_when_old_enough_even_if_the_stream_stops():
    clock, records = _Clock(), []
    m = DriftMonitor("p", DriftConfig(window=1000, min_window_s=5.0), features=["x"],
                     window=None, hop=None, record=records.append, clock=lambda: 0.0,
                     monotonic=clock, alert=lambda k, d: None)
    m.observe_rows(["s"] * 1200, np.zeros((1200, 1)))
    m.tick()
    assert records == []  # full, but 0 s old
    clock.t += 5.0
    m.tick()  # the stream has stopped: the rate tick closes it
    assert [(r["kind"], r["samples"]) for r in records] == [("input", 1200)]
    m.tick()
    assert len(records) == 1  # an empty new window is not closed


def test_min_window_s_zero_closes_windows_by_count_alone():
    records: list = []
    m = DriftMonitor("p", DriftConfig(window=1000, min_window_s=0), features=["x"],
                     window=None, hop=None, record=records.append, clock=lambda: 0.0,
                     monotonic=lambda: 0.0, alert=lambda k, d: None)
    m.observe_rows(["s"] * 5000, np.zeros((5000, 1)))
    assert [r["samples"] for r in records] == [1000] * 5


def test_versions_closing_their_output_windows_at_once_get_records_of_their_own():
    """Two versions' output windows closed by the same rate tick, in the same microsecond of
    a wall clock: one id would have made them one record in the outbox and upstream."""
    from edgeml.core.drift import drift_record_id

    rng = np.random.default_rng(3)
    train = rng.normal(size=(5000, 2))
    ref = make_reference(train, ["x", "y"], None, kind="classifier",
                         labels=(train[:, 0] > 0).astype(int))
    clock, records = _Clock(), []
    m = DriftMonitor("p", DriftConfig(window=1000, output_window=100, min_window_s=1.0),
                     features=["x", "y"], window=None, hop=None, record=records.append,
                     clock=lambda: 1_700_000_000.0, monotonic=clock, alert=lambda k, d: None)
    m.set_versions({"m:1": (ref, "classifier"), "m:2": (ref, "classifier")})
    for key in ("m:1", "m:2"):
        m.observe_outputs(key, [1, 0] * 100, None)
    clock.t += 1.0
    m.tick()
    assert sorted(r["version"] for r in records) == ["m:1", "m:2"]
    ids = {drift_record_id("dev", "p", r) for r in records}
    assert ids == {"dev/p/drift/output/m:1/1700000000.000000",
                   "dev/p/drift/output/m:2/1700000000.000000"}
    assert drift_record_id("dev", "p", {"kind": "input", "ts": 1.5}) == "dev/p/drift/input/1.500000"
