"""Drift against a bundle's reference profile (pure logic, numpy only).

A bundle made with ``edgeml convert --training-data`` carries a ``reference`` (see
docs/bundle-format.md): per input channel quantile bin edges with the training frequencies,
min/max, mean, std and missing rate; per model output a label frequency table or a score
histogram. :func:`profile_column` / :func:`profile_outputs` make it on the host, the device
compares windows of live rows with it (:class:`DriftMonitor`), and ``edgeml replay`` compares
an archived snapshot (:func:`compare_inputs`).

Figures, per channel and per output:

* PSI (population stability index) ``sum((a - e) * ln(a / e))`` over the reference's bins,
  both sides floored at :data:`EPS`. Conventions: < 0.1 stable, 0.1-0.25 moderate, > 0.25
  a significant shift. For ``n`` independent samples the statistic's bias is about
  ``(bins - 1) / n`` (0.009 for 10 bins and 1,000 samples), so a window of a few thousand
  samples keeps the noise floor far below 0.1 (sensor samples are autocorrelated, which
  makes the effective ``n`` smaller: see docs/operations.md for the measured floor).
* binned KS: the largest gap between the two cumulative bin distributions (0..1).

Bins follow ``numpy.searchsorted(edges, x, side="right")`` on both sides: ``len(edges) + 1``
bins, a value equal to an edge goes into the bin above it.
"""

from __future__ import annotations

import collections
import logging
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeml.config import DriftConfig as DriftSettings
from edgeml.core.health import AlertGate, RateTracker

log = logging.getLogger("edgeml.core.drift")
_TOPIC = operator.attrgetter("topic")

REFERENCE_VERSION = 1
DEFAULT_BINS = 10
EPS = 1e-4  # floor for a bin's share: an empty bin costs a bounded, large PSI term
FLUSH_SAMPLES = 512  # live samples are binned in chunks this big (amortises numpy calls)
OUTPUT_FLUSH = 256  # likewise output rows


def _r(v: float) -> float:
    """Six significant digits: the reference stays a few kB and the JSON canonical."""
    if not math.isfinite(v):
        return 0.0
    return float(f"{v:.6g}")


# ---- the reference profile (host side) ------------------------------------------------------
def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, values, side="right")


def profile_column(values: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Quantile bin edges (``bins - 1`` interior edges, ties merged) with the frequency of
    each bin, min, max, mean, std and the missing (non-finite) rate of one column."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(v)
    missing = 1.0 - (finite.mean() if v.size else 1.0)
    v = v[finite]
    if v.size == 0:
        return {"edges": [], "freq": [1.0], "min": 0.0, "max": 0.0, "mean": 0.0, "std": 0.0,
                "missing": _r(missing), "n": 0}
    qs = np.quantile(v, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = np.unique(np.asarray([_r(q) for q in qs]))
    counts = np.bincount(bin_index(edges, v), minlength=len(edges) + 1)
    freq = counts / counts.sum()
    return {"edges": [float(e) for e in edges], "freq": [_r(f) for f in freq],
            "min": _r(v.min()), "max": _r(v.max()), "mean": _r(v.mean()), "std": _r(v.std()),
            "missing": _r(missing), "n": int(v.size)}


def label_profile(labels: Sequence[Any]) -> dict[str, Any]:
    keys, counts = np.unique(np.asarray([str(x) for x in labels]), return_counts=True)
    total = max(int(counts.sum()), 1)
    return {"labels": [str(k) for k in keys], "freq": [_r(c / total) for c in counts],
            "n": int(counts.sum())}


def output_score(kind: str, labels: Any, scores: Any) -> np.ndarray | None:
    """The one number per row whose distribution is profiled: a classifier's top class
    probability (its confidence), an anomaly model's score, a regressor's prediction."""
    if kind == "regressor":
        src = scores if scores is not None else labels
        return None if src is None else np.asarray(src, dtype=np.float64).reshape(-1)
    if scores is None:
        return None
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        return s
    return s.max(axis=1) if s.shape[1] > 1 else s[:, 0]


def profile_outputs(kind: str, labels: Any, scores: Any,
                    bins: int = DEFAULT_BINS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kind != "regressor" and labels is not None:
        out["label"] = label_profile(np.asarray(labels).reshape(-1).tolist())
    score = output_score(kind, labels, scores)
    if score is not None:
        out["score"] = profile_column(score, bins)
    return out


def channel_samples(rows: np.ndarray, n_features: int, window: int | None) -> np.ndarray:
    """Rows (flat sample-major windows or single samples) -> ``[samples, n_features]``."""
    arr = np.asarray(rows, dtype=np.float64)
    return arr.reshape(-1, n_features) if window else arr.reshape(len(arr), n_features)


def make_reference(rows: np.ndarray, features: Sequence[str], window: int | None, *,
                   kind: str, labels: Any = None, scores: Any = None,
                   bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """The manifest's ``reference`` from training rows (as the device sees them) and the
    model's own outputs on them."""
    samples = channel_samples(rows, len(features), window)
    return {
        "v": REFERENCE_VERSION, "bins": bins, "rows": len(rows),
        "samples": len(samples), "window": window,
        "inputs": {f: profile_column(samples[:, i], bins) for i, f in enumerate(features)},
        "outputs": profile_outputs(kind, labels, scores, bins),
    }


# ---- comparison -----------------------------------------------------------------------------
def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(np.asarray(expected, dtype=np.float64), EPS)
    a = np.maximum(np.asarray(actual, dtype=np.float64), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_binned(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.max(np.abs(np.cumsum(expected) - np.cumsum(actual)), initial=0.0))


def shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


@dataclass(frozen=True)
class ColumnRef:
    edges: np.ndarray
    freq: np.ndarray
    lo: float
    hi: float
    std: float

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> ColumnRef:
        return cls(np.asarray(d["edges"], dtype=np.float64), np.asarray(d["freq"], np.float64),
                   float(d["min"]), float(d["max"]), float(d.get("std", 0.0)))


def compare_column(ref: ColumnRef, values: np.ndarray) -> dict[str, float]:
    """PSI, binned KS and the share outside the training range of one column of values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    counts = np.bincount(bin_index(ref.edges, v), minlength=len(ref.freq))
    a = shares(counts)
    return {"psi": psi(ref.freq, a), "ks": ks_binned(ref.freq, a),
            "out_of_range": float(np.mean((v < ref.lo) | (v > ref.hi))) if v.size else 0.0,
            "n": int(v.size)}


def compare_inputs(reference: Mapping[str, Any], rows: np.ndarray,
                   features: Sequence[str], window: int | None) -> dict[str, dict]:
    """Per channel figures of ``rows`` against a reference (``edgeml replay``)."""
    samples = channel_samples(rows, len(features), window)
    refs = reference.get("inputs", {})
    return {f: compare_column(ColumnRef.parse(refs[f]), samples[:, i])
            for i, f in enumerate(features) if f in refs}


def drift_record_id(device: str, pipeline: str, doc: Mapping[str, Any]) -> str:
    """The ``record_id`` of one closed window's record on the outbox's ``drift`` stream.
    Output windows name their version: several versions' windows may close at the same
    microsecond (the same batch, or one rate tick), and records with one id are one record
    to the outbox and upstream."""
    kind, ts = doc["kind"], f"{doc['ts']:.6f}"
    if kind == "output":
        return f"{device}/{pipeline}/drift/output/{doc['version']}/{ts}"
    return f"{device}/{pipeline}/drift/{kind}/{ts}"


# ---- the device side ------------------------------------------------------------------------
class _OutputWindow:
    """One version's outputs against its reference. ``stagger``: rows counted as already
    buffered at the start of each window, so the versions of one pipeline, which all see
    the same rows, bin their buffers at different batches rather than all at once."""

    def __init__(self, ref: Mapping[str, Any], kind: str, stagger: int = 0,
                 opened: float = 0.0) -> None:
        self.kind = kind
        self.stagger = stagger
        lab = ref.get("label")
        self.labels = None if lab is None else {k: i for i, k in enumerate(lab["labels"])}
        self.label_freq = None if lab is None else np.asarray(lab["freq"], dtype=np.float64)
        sc = ref.get("score")
        self.score = None if sc is None else ColumnRef.parse(sc)
        self.reset(opened)

    def reset(self, opened: float) -> None:
        """A new window, opened at ``opened`` (the monitor's monotonic clock)."""
        self.opened = opened
        self.n = 0
        self._pending = self.stagger
        self._pl: list = []
        self._ps: list = []
        self.label_counts = np.zeros(0 if self.labels is None else len(self.labels) + 1)
        self.score_counts = np.zeros(0 if self.score is None else len(self.score.freq))

    def add(self, labels: Sequence[Any] | None, scores: Any) -> None:
        """Buffered: binned :data:`OUTPUT_FLUSH` rows at a time (and before figures)."""
        n = len(labels) if labels is not None else (len(scores) if scores is not None else 0)
        if labels is not None and self.labels is not None:
            self._pl.extend(labels)
        if scores is not None or (self.kind == "regressor" and labels is not None):
            self._ps.append((labels, scores))
        self.n += n
        self._pending += n
        if self._pending >= OUTPUT_FLUSH:
            self._digest()

    def _digest(self) -> None:
        self._pending = 0
        if self._pl:
            # counted per distinct label, then mapped: one version's labels are one type
            other = len(self.labels)
            try:
                counted = collections.Counter(self._pl).items()
            except TypeError:  # a label that is a list (multi-label output)
                counted = collections.Counter(str(x) for x in self._pl).items()
            for label, n in counted:
                self.label_counts[self.labels.get(str(label), other)] += n
            self._pl = []
        if self._ps:
            parts, self._ps = self._ps, []
            if self.score is None:
                return
            v = self._scores(parts)
            if v is not None:
                v = v[np.isfinite(v)]
                self.score_counts += np.bincount(bin_index(self.score.edges, v),
                                                 minlength=len(self.score.freq))

    def _scores(self, parts: list) -> np.ndarray | None:
        """:func:`output_score` of every buffered batch at once. At batch size 1 a flush holds
        hundreds of one-row arrays; scoring them one by one stalled the event loop for
        milliseconds every few hundred rows (a version each, all at the same row)."""
        if self.kind != "regressor":
            arrays = [sc for _, sc in parts if sc is not None]
            if arrays:
                try:  # one version's scores share their width; a mix falls through
                    return output_score(self.kind, None, np.concatenate(arrays))
                except ValueError:
                    pass
        vals = [output_score(self.kind, lab, sc) for lab, sc in parts]
        vals = [v for v in vals if v is not None]
        return np.concatenate(vals) if vals else None

    def figures(self) -> dict[str, float]:
        self._digest()
        out: dict[str, float] = {}
        if self.labels is not None and self.label_counts.sum():
            e = np.append(self.label_freq, 0.0)  # labels never seen in training: one bin
            a = shares(self.label_counts)
            out["label_psi"] = psi(e, a)
        if self.score is not None and self.score_counts.sum():
            a = shares(self.score_counts)
            out["score_psi"] = psi(self.score.freq, a)
            out["score_ks"] = ks_binned(self.score.freq, a)
        return out


class DriftMonitor:
    """One pipeline's drift and sensor-health watch.

    Fed on the event loop: :meth:`observe_rows` once per scored batch (the inputs),
    :meth:`observe_outputs` with each batch's outcomes, :meth:`tick` every
    ``rate_interval_s`` (message rates). Raises and clears alerts through ``alert(kind,
    detail)``; hands one record per closed window to ``record(doc)``.
    """

    def __init__(self, pipeline: str, settings: DriftSettings, *, features: Sequence[str],
                 window: int | None, hop: int | None,
                 alert: Callable[[str, dict], None], record: Callable[[dict], None],
                 clock: Callable[[], float],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.pipeline = pipeline
        self.s = settings
        self.features = tuple(features)
        self.nf = len(self.features)
        self.window = window
        self.take = hop if window and hop else window  # new samples per window row
        self._alert = alert
        self._record = record
        self._clock = clock  # wall time, for the records' ts
        self._mono = monotonic  # window ages (min_window_s): immune to clock jumps
        self.ref: dict[str, Any] | None = None
        self.ref_version: str | None = None
        self._cols: list[ColumnRef | None] = []
        self._buf: list[np.ndarray] = []
        self._buf_topics: list[tuple[str, int]] = []
        self._buffered = 0
        self._reset_window()
        self.windows = 0
        self.samples = 0
        self.rows = 0
        self.batch_sizes = [0] * 8  # counts per BATCH_LE bucket (+Inf last)
        self.current: dict[str, Any] = {}
        self.outputs: dict[str, _OutputWindow] = {}
        self.output_current: dict[str, dict] = {}
        self.gates: dict[tuple[str, str], AlertGate] = {}
        self.rates = RateTracker(settings.rate_drop_ratio, settings.max_sources,
                                 settings.consecutive)
        self.alerts_raised = 0
        self.enabled = settings.enabled
        self.errors = 0
        self.stats: Any = None  # the pipeline's PipelineStats: rejected share per window
        self._rej0 = (0, 0)
        self._members: Any = None

    # ---- configuration ----------------------------------------------------------------
    def set_reference(self, reference: Mapping[str, Any] | None, version: str | None) -> None:
        """The input reference (the champion's, or the first version that has one)."""
        if version == self.ref_version:
            return
        self.ref = dict(reference) if reference is not None else None
        self.ref_version = version
        refs = (reference or {}).get("inputs", {})
        self._cols = [ColumnRef.parse(refs[f]) if f in refs else None for f in self.features]
        self._reset_window()

    def set_versions(self, versions: Mapping[str, tuple[Mapping[str, Any] | None, str]]) -> None:
        """``{"name:version": (reference or None, output kind)}`` of the active set."""
        for key in list(self.outputs):
            if key not in versions:
                del self.outputs[key]
                self.output_current.pop(key, None)
        for i, (key, (ref, kind)) in enumerate(versions.items()):
            if key not in self.outputs and ref and ref.get("outputs"):
                self.outputs[key] = _OutputWindow(ref["outputs"], kind,
                                                  stagger=i * OUTPUT_FLUSH // len(versions),
                                                  opened=self._mono())

    # ---- the scoring hook --------------------------------------------------------------------
    def on_batch(self, batch: Sequence[Any], x: np.ndarray, members: Sequence[Any]) -> None:
        """One scored batch's input rows (``Row`` objects and their stacked features).
        Never raises: a fault here is counted and logged, the batch is scored regardless."""
        try:
            self.follow(members)
            if not self.enabled or not self.nf:
                self.rows += len(batch)
                self.batch_sizes[min(len(batch).bit_length(), 7)] += 1
                return
            self.observe_rows(list(map(_TOPIC, batch)), x)
        except Exception:
            self._fault("inputs")

    def on_outcomes(self, outcomes: Sequence[Any]) -> None:
        """Each version's outcome for one batch (late ones too). Never raises."""
        if not self.outputs:
            return
        try:
            for o in outcomes:
                if o.labels is not None or o.scores is not None:
                    self.observe_outputs(f"{o.name}:{o.version}", o.labels, o.scores)
        except Exception:
            self._fault("outputs")

    def _fault(self, where: str) -> None:
        self.errors += 1
        if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
            log.exception("pipeline %s: drift watch failed on %s (%d so far); scoring goes on",
                          self.pipeline, where, self.errors)
        self._buf, self._buf_topics, self._buffered = [], [], 0

    def follow(self, members: Sequence[Any]) -> None:
        """Re-read the references when the active set changed (an identity check)."""
        if members is not self._members:
            self._members = members
            self.sync_members(members)

    def sync_members(self, members: Sequence[Any]) -> None:
        """Follow the active set: the input reference is the champion's (or the first version
        by priority that has one); every version with a reference gets an output window."""
        with_ref = [m for m in members if getattr(m.manifest, "reference", None)]
        pick = next((m for m in with_ref if m.role == "champion"),
                    with_ref[0] if with_ref else None)
        if not self.features and members:  # the pipeline names one array field
            self.features = tuple(members[0].manifest.input.features)
            self.nf = len(self.features)
        if pick is None:
            self.set_reference(None, None)
        else:
            self.set_reference(pick.manifest.reference, f"{pick.name}:{pick.version}")
        self.set_versions({f"{m.name}:{m.version}": (m.manifest.reference,
                                                     m.manifest.outputs.kind)
                           for m in with_ref})

    # ---- feeding --------------------------------------------------------------------------
    def observe_rows(self, topics: Sequence[str], x: np.ndarray) -> None:
        n = len(x)
        self.rows += n
        self.batch_sizes[min(int(n).bit_length(), 7)] += 1
        if self.take:
            x = x.reshape(n, self.window, self.nf)[:, -self.take:, :].reshape(-1, self.nf)
            per = self.take
        else:
            x = x.reshape(n, self.nf)
            per = 1
        add = self.rates.add
        for t, k in collections.Counter(topics).items():
            add(t, k * per)
        start = 0
        while start < n:  # split at window boundaries: a window holds `window` samples
            room = self.s.window - self._wn - self._buffered
            if room <= 0 and not self._input_due():
                # full, but younger than min_window_s: it takes rows a flush at a time
                room = FLUSH_SAMPLES
            k = min(n - start, max(1, -(-room // per)))
            self._buf.append(x[start * per:(start + k) * per])
            self._buf_topics.append((tuple(topics[start:start + k]), per))
            self._buffered += k * per
            start += k
            if self._buffered >= min(FLUSH_SAMPLES, max(room, 1)):
                self._flush()

    def observe_outputs(self, key: str, labels: Sequence[Any] | None, scores: Any) -> None:
        w = self.outputs.get(key)
        if w is None:
            return
        w.add(labels, scores)
        if w.n >= self.s.output_window and self._mono() - w.opened >= self.s.min_window_s:
            self._close_output(key, w)

    def _input_due(self) -> bool:
        """The input window may close once it holds ``window`` samples (and rows buffered
        for it) and is at least ``min_window_s`` old."""
        return (self._wn + self._buffered >= self.s.window
                and self._mono() - self._opened >= self.s.min_window_s)

    def close_due(self) -> None:
        """Close the windows that are full and old enough: a stream that stops right after
        filling a young window still gets its record (called from :meth:`tick`)."""
        if self._input_due():
            self._flush()  # closes it, unless nothing was buffered:
            if self._wn >= self.s.window:
                self._close_input()
        now = self._mono()
        for key, w in list(self.outputs.items()):
            if w.n >= self.s.output_window and now - w.opened >= self.s.min_window_s:
                self._close_output(key, w)

    # ---- windows ---------------------------------------------------------------------------
    def _reset_window(self) -> None:
        nb = [len(c.freq) if c is not None else 1 for c in self._cols] if hasattr(
            self, "_cols") else []
        self._opened = self._mono()
        self._wn = 0
        self._counts = [np.zeros(b, dtype=np.int64) for b in nb]
        self._oor = np.zeros(len(nb), dtype=np.int64)
        self._src: dict[str, list] = {}  # topic -> [min, max, n]
        self._src_other = 0

    def _flush(self) -> None:
        if not self._buf:
            return
        x = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        parts, self._buf, self._buf_topics = self._buf_topics, [], []
        self._buffered = 0
        if self._cols:
            for i, c in enumerate(self._cols):
                if c is None:
                    continue
                col = x[:, i]
                self._counts[i] += np.bincount(bin_index(c.edges, col),
                                               minlength=len(c.freq))
                self._oor[i] += np.count_nonzero((col < c.lo) | (col > c.hi))
        # per source: min/max for the stuck check (bounded number of sources), grouped so a
        # flush costs a few numpy calls per source, not per row
        per = parts[0][1]
        owners: dict[str, list[int]] = {}
        i = 0
        for topics, _per in parts:
            first = topics[0]
            if topics.count(first) == len(topics):  # the usual part: one source's rows
                owners.setdefault(first, []).extend(range(i, i + len(topics)))
            else:
                for t in topics:
                    owners.setdefault(t, []).append(i)
                    i += 1
                continue
            i += len(topics)
        blocks = x.reshape(-1, per, x.shape[1]) if per > 1 else None
        whole = len(owners) == 1
        for t, idx in owners.items():
            s = self._src.get(t)
            if s is None and len(self._src) >= self.s.max_sources:
                self._src_other += len(idx)
                continue
            if whole:  # one source: every row is its own, in order
                block = x
            else:
                block = x[idx] if blocks is None else blocks[idx].reshape(-1, x.shape[1])
            lo, hi = block.min(0), block.max(0)
            if s is None:
                self._src[t] = [lo, hi, len(block)]
            else:
                np.minimum(s[0], lo, out=s[0])
                np.maximum(s[1], hi, out=s[1])
                s[2] += len(block)
        self._wn += len(x)
        self.samples += len(x)
        if self._wn >= self.s.window and self._mono() - self._opened >= self.s.min_window_s:
            self._close_input()

    def _close_input(self) -> None:
        self.windows += 1
        n = self._wn
        doc: dict[str, Any] = {"pipeline": self.pipeline, "kind": "input", "ts": self._clock(),
                               "window": self.windows, "samples": n,
                               "reference": self.ref_version}
        psis: dict[str, float] = {}
        kss: dict[str, float] = {}
        oor: dict[str, float] = {}
        for i, c in enumerate(self._cols):
            if c is None:
                continue
            f = self.features[i]
            a = shares(self._counts[i])
            psis[f] = round(psi(c.freq, a), 5)
            kss[f] = round(ks_binned(c.freq, a), 5)
            oor[f] = round(float(self._oor[i]) / n, 5) if n else 0.0
        stuck = []
        for t, (mn, mx, cnt) in self._src.items():
            if cnt < self.s.stuck_min_samples:
                continue
            for i, f in enumerate(self.features):
                c = self._cols[i] if self._cols else None
                if mn[i] == mx[i] and (c is None or c.std > 0):
                    stuck.append({"source": t, "channel": f, "value": float(mn[i])})
        rejected = None
        if self.stats is not None:  # missing / non-finite / malformed input is dead-lettered
            rec, rej = self.stats.received, self.stats.rejected
            d_rec, d_rej = rec - self._rej0[0], rej - self._rej0[1]
            self._rej0 = (rec, rej)
            rejected = round(d_rej / d_rec, 5) if d_rec > 0 else 0.0
        doc.update(psi=psis, ks=kss, out_of_range=oor, stuck=stuck[:50],
                   sources=len(self._src), sources_untracked=self._src_other,
                   rejected=rejected)
        self.current = doc
        self._reset_window()
        self._record(doc)
        base = {"reference": self.ref_version, "window": self.windows, "samples": n}
        worst = max(psis, key=psis.get) if psis else None
        bad = worst is not None and (
            psis[worst] >= self.s.psi_alert
            or (self.s.ks_alert is not None and max(kss.values()) >= self.s.ks_alert))
        self._gate("input_drift", "", bad, {
            **base, "channel": worst, "psi": psis, "ks": kss,
            "threshold": self.s.psi_alert})
        worst_oor = max(oor, key=oor.get) if oor else None
        self._gate("out_of_range", "", worst_oor is not None
                   and oor[worst_oor] >= self.s.out_of_range,
                   {**base, "channel": worst_oor, "share": oor,
                    "threshold": self.s.out_of_range})
        stuck_keys = {f"{s['source']}|{s['channel']}": s for s in stuck}
        for key in set(stuck_keys) | {k for (kind, k) in self.gates if kind == "sensor_stuck"}:
            s = stuck_keys.get(key)
            src, ch = key.split("|", 1)
            self._gate("sensor_stuck", key, s is not None,
                       {**base, "source": src, "channel": ch,
                        **({"value": s["value"]} if s else {})})

    def _close_output(self, key: str, w: _OutputWindow) -> None:
        figs = {k: round(v, 5) for k, v in w.figures().items()}
        doc = {"pipeline": self.pipeline, "kind": "output", "ts": self._clock(),
               "version": key, "rows": w.n, **figs}
        self.output_current[key] = doc
        w.reset(self._mono())
        self._record(doc)
        worst = max((v for k, v in figs.items() if k.endswith("psi")), default=None)
        if worst is None:
            return
        self._gate("output_drift", key, worst >= self.s.psi_alert,
                   {"model": key.split(":", 1)[0], "version": key.split(":", 1)[-1],
                    "reference": key, "rows": doc["rows"], **figs,
                    "threshold": self.s.psi_alert})

    def tick(self, now: float | None = None) -> None:
        """Message rates per source since the last tick; ``rate_drop`` alerts; windows that
        waited for ``min_window_s`` closed."""
        try:
            self.close_due()
        except Exception:
            self._fault("windows")
        for src, bad, figs in self.rates.tick(self._clock() if now is None else now):
            self._gate("rate_drop", src, bad, {"source": src, **figs,
                                              "ratio": self.s.rate_drop_ratio,
                                              "reference": self.ref_version})

    def _gate(self, kind: str, key: str, bad: bool, detail: dict) -> None:
        g = self.gates.get((kind, key))
        if g is None:
            if not bad:
                return
            g = self.gates[(kind, key)] = AlertGate(self.s.consecutive)
        change = g.update(bad)
        if change == "raised":
            self.alerts_raised += 1
            self._alert(kind, {"state": "raised", **detail})
        elif change == "cleared":
            self._alert(kind, {"state": "cleared", **detail})
            del self.gates[(kind, key)]

    # ---- reporting -------------------------------------------------------------------------
    def active_alerts(self) -> list[str]:
        return sorted(f"{k}:{s}" if s else k for (k, s), g in self.gates.items() if g.active)

    def status(self) -> dict:
        cur = self.current
        worst = max(cur.get("psi", {}).values(), default=None)
        level = None if worst is None else ("significant" if worst >= self.s.psi_alert else
                                            "moderate" if worst >= self.s.psi_warn else "stable")
        return {"enabled": self.enabled, "reference": self.ref_version,
                "windows": self.windows, "level": level,
                "window_fill": self._wn + self._buffered, "window": self.s.window,
                "psi": cur.get("psi", {}), "ks": cur.get("ks", {}),
                "out_of_range": cur.get("out_of_range", {}),
                "stuck": cur.get("stuck", []),
                "outputs": {k: {kk: vv for kk, vv in v.items() if kk.endswith(("psi", "ks"))}
                            for k, v in self.output_current.items()},
                "rejected": cur.get("rejected"), "errors": self.errors,
                "alerts": self.active_alerts(), "sources": self.rates.status()}


#: batch size histogram: batch_sizes[i] counts batches of 2**(i-1) .. 2**i - 1 rows
BATCH_LE = (0, 1, 3, 7, 15, 31, 63)


class SnapshotDrift:
    """A whole archived snapshot against one bundle's reference (``edgeml replay``): input
    bin counts accumulated over every row (for window models the ``hop`` newest samples of
    each, or every sample when no hop is known), the version's outputs likewise."""

    def __init__(self, reference: Mapping[str, Any], features: Sequence[str], kind: str,
                 window: int | None, hop: int | None = None) -> None:
        refs = reference.get("inputs", {})
        self.features = tuple(features)
        self.cols = {f: ColumnRef.parse(refs[f]) for f in self.features if f in refs}
        self.window = window
        self.take = hop or window
        self.counts = {f: np.zeros(len(c.freq), dtype=np.int64) for f, c in self.cols.items()}
        self.oor = dict.fromkeys(self.cols, 0)
        self.n = 0
        self.out = _OutputWindow(reference.get("outputs", {}), kind)

    def add_rows(self, x: np.ndarray) -> None:
        nf = len(self.features)
        if self.window:
            x = np.asarray(x).reshape(len(x), self.window, nf)[:, -self.take:, :]
        samples = np.asarray(x, dtype=np.float64).reshape(-1, nf)
        self.n += len(samples)
        for i, f in enumerate(self.features):
            c = self.cols.get(f)
            if c is None:
                continue
            col = samples[:, i]
            self.counts[f] += np.bincount(bin_index(c.edges, col), minlength=len(c.freq))
            self.oor[f] += int(np.count_nonzero((col < c.lo) | (col > c.hi)))

    def add_outputs(self, labels: Sequence[Any] | None, scores: Any) -> None:
        self.out.add(labels, scores)

    def figures(self, psi_alert: float = 0.25) -> dict[str, Any]:
        inputs = {}
        for f, c in self.cols.items():
            a = shares(self.counts[f])
            inputs[f] = {"psi": round(psi(c.freq, a), 5), "ks": round(ks_binned(c.freq, a), 5),
                         "out_of_range": round(self.oor[f] / self.n, 5) if self.n else 0.0}
        outputs = {k: round(v, 5) for k, v in self.out.figures().items()}
        worst = max((v["psi"] for v in inputs.values()), default=None)
        worst_out = max((v for k, v in outputs.items() if k.endswith("psi")), default=None)
        return {"samples": self.n, "inputs": inputs, "outputs": outputs,
                "max_input_psi": worst, "max_output_psi": worst_out,
                "input_drift": worst is not None and worst >= psi_alert,
                "output_drift": worst_out is not None and worst_out >= psi_alert}
