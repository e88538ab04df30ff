"""Replay: archived inputs through candidate bundles, offline, and a fair comparison of them.

"Is iteration 15 better than iteration 14 on last week's data?" The raw-input archive holds
what the daemon really received; :func:`replay` feeds it through the daemon's own
:class:`~edgeml.core.assemble.Assembler` (the same decoding and windowing code, not a second
implementation) and scores every row with every version on the same batches. The report
says, per version, what it answered (output distribution), how fast (latency per row and per
batch), how often it agrees with each other version and, when the true labels are known,
how often it is right (accuracy, macro F1, confusion matrix).

The metrics are computed with numpy only: this path runs on devices, where scikit-learn is
not installed. Versions are scored one after the other on each batch (not in parallel as in
the daemon) so that their latencies are not measured while they compete for the same cores.
"""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.core.assemble import Assembler, Row
from edgeml.errors import (
    ChartUnavailableError,
    DecodeError,
    ModelError,
    RawLogError,
    ReplayError,
)

REPORT_FORMAT = "edgeml-replay-report"
REPORT_VERSION = 1
DEFAULT_BATCH = 256
PROGRESS_EVERY_RECORDS = 4096  # progress() is called at least this often (and per batch)
REGRESSOR_RTOL = 1e-5  # two regressor outputs "agree" when np.isclose with these tolerances
REGRESSOR_ATOL = 1e-8





# ---- the report ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencySummary:
    """Milliseconds. Percentiles are the inverted-CDF kind: each is an observed value."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ConfusionMatrix:
    """``matrix[i][j]``: rows whose true label is ``labels[i]`` and predicted ``labels[j]``.
    ``labels`` are every label seen as truth or prediction, sorted (as scikit-learn does)."""

    labels: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "matrix": [list(r) for r in self.matrix]}


@dataclass(frozen=True)
class VersionReport:
    """One bundle's figures over the replay."""

    key: str                    # "name:version", how the report names the version
    name: str
    version: str
    kind: str                   # classifier | anomaly | regressor
    sha256: str
    rows: int                   # rows this version scored
    errors: int                 # rows lost to scoring errors (the batch failed)
    last_error: str | None
    distribution: dict[str, int] | None   # label -> rows (classifier, anomaly)
    values: dict[str, float] | None       # count/mean/std/min/max of the output (regressor)
    latency_row_ms: LatencySummary        # batch time / rows in the batch, per row
    latency_batch_ms: LatencySummary      # one onnxruntime run per batch
    scoring_s: float
    rows_per_s: float | None              # rows / scoring_s (model time only)
    load_ms: float | None
    labelled_rows: int
    accuracy: float | None
    macro_f1: float | None
    confusion: ConfusionMatrix | None
    # the snapshot against this bundle's reference profile (None: the bundle has none)
    drift: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["latency_row_ms"] = self.latency_row_ms.to_dict()
        d["latency_batch_ms"] = self.latency_batch_ms.to_dict()
        d["confusion"] = self.confusion.to_dict() if self.confusion else None
        return d


@dataclass(frozen=True)
class ReplayReport:
    """Everything a replay measured. ``agreement[i][j]`` is the share of the rows scored by
    both version i and version j on which they gave the same label (``None``: no such row);
    ``agreement_rows[i][j]`` is how many rows that share is of."""

    records: int                     # archived messages read
    rejected: int                    # messages the decoder refused (skipped, like the DLQ)
    rejected_by_reason: dict[str, int]
    rows: int                        # model input rows the assembler made
    labelled_rows: int
    labels_source: str | None        # "payload" | "labels" | None
    batches: int
    batch_size: int
    first_seq: int | None
    last_seq: int | None
    first_received: float | None
    last_received: float | None
    elapsed_s: float                 # wall time of the whole replay
    assemble_s: float                # of which decoding + windowing
    records_per_s: float | None      # records / elapsed_s, end to end
    rows_per_s: float | None         # rows / elapsed_s, end to end
    evicted_windows: int
    versions: tuple[VersionReport, ...]
    agreement: tuple[tuple[float | None, ...], ...]
    agreement_rows: tuple[tuple[int, ...], ...]
    source: dict[str, Any] = field(default_factory=dict)  # where the records came from (CLI)

    def version(self, key: str) -> VersionReport:
        for v in self.versions:
            if v.key == key:
                return v
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": REPORT_FORMAT, "format_version": REPORT_VERSION}
        for f in fields(self):
            d[f.name] = getattr(self, f.name)
        d["versions"] = [v.to_dict() for v in self.versions]
        d["agreement"] = {
            "versions": [v.key for v in self.versions],
            "matrix": [list(r) for r in self.agreement],
            "rows": [list(r) for r in self.agreement_rows],
        }
        del d["agreement_rows"]
        d["source"] = dict(self.source)
        return d


@dataclass(frozen=True)
class ReplayProgress:
    """Handed to the ``progress`` callback after every batch (and every few thousand
    records), and once more at the end with ``done=True``."""

    records: int
    rows: int
    rejected: int
    elapsed_s: float
    last_seq: int | None
    done: bool = False


# ---- labels --------------------------------------------------------------------------------
def label_key(value: Any) -> str | None:
    """One spelling per label, so that ``"1"`` from a CSV file, ``1`` from JSON, ``1.0``
    from msgpack and an int64 from ONNX compare equal; ``None`` stays "no label"."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value
    return str(value)


def read_labels(path: str | Path) -> dict[int, Any]:
    """A labels file keyed by sequence number: CSV ``seq,label`` (a header line naming
    ``seq`` and ``label`` is optional) or JSON ``{"<seq>": label, ...}``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ReplayError(f"{p}: cannot read labels: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ReplayError(f"{p}: labels file is not UTF-8 text") from exc
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return _labels_json(p, text)
    if stripped.startswith("["):
        raise ReplayError(f"{p}: a JSON labels file must be an object {{\"<seq>\": label}}, "
                          "not a list")
    return _labels_csv(p, text)


def _seq_key(p: Path, where: str, raw: Any) -> int:
    try:
        seq = int(str(raw).strip())
    except ValueError:
        raise ReplayError(f"{p}: {where}: sequence number {raw!r} is not an integer") from None
    if seq < 0:
        raise ReplayError(f"{p}: {where}: sequence number {seq} is negative")
    return seq


def _labels_json(p: Path, text: str) -> dict[int, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ReplayError(f"{p}: not valid JSON: {exc}") from exc
    out: dict[int, Any] = {}
    for k, v in doc.items():
        if isinstance(v, (dict, list)):
            raise ReplayError(f"{p}: key {k!r}: a label must be a string or a number, "
                              f"not {type(v).__name__}")
        out[_seq_key(p, f"key {k!r}", k)] = v
    return out


def _labels_csv(p: Path, text: str) -> dict[int, Any]:
    rows = list(csv.reader(text.splitlines()))
    out: dict[int, Any] = {}
    seq_col, label_col, start = 0, 1, 0
    if rows and rows[0]:
        head = [c.strip().lower() for c in rows[0]]
        try:
            int(head[0])
        except ValueError:
            if "seq" not in head or "label" not in head:
                raise ReplayError(f"{p}: line 1: a header must name the columns 'seq' and "
                                  f"'label' (got {', '.join(rows[0])})") from None
            seq_col, label_col, start = head.index("seq"), head.index("label"), 1
    for n, row in enumerate(rows[start:], start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(seq_col, label_col):
            raise ReplayError(f"{p}: line {n}: expected 'seq,label', got {','.join(row)!r}")
        seq = _seq_key(p, f"line {n}", row[seq_col])
        if seq in out:
            raise ReplayError(f"{p}: line {n}: sequence number {seq} is listed twice")
        out[seq] = row[label_col].strip()
    if not out:
        raise ReplayError(f"{p}: no labels in the file")
    return out


# ---- metrics (numpy only: no scikit-learn on the device) -----------------------------------
def _percentiles(values: np.ndarray, weights: np.ndarray | None,
                 qs: Sequence[float]) -> list[float]:
    """Inverted-CDF percentiles of ``values`` where value i counts ``weights[i]`` times: the
    same as ``np.percentile(np.repeat(values, weights), q, method="inverted_cdf")`` without
    building the repeated array (a long replay has millions of rows)."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    w = np.ones(len(v)) if weights is None else weights[order].astype(np.float64)
    cum = np.cumsum(w)
    total = cum[-1]
    out = []
    for q in qs:
        i = int(np.searchsorted(cum, total * q / 100.0, side="left"))
        out.append(float(v[min(i, len(v) - 1)]))
    return out


def latency_summary(values: Sequence[float], weights: Sequence[int] | None = None
                    ) -> LatencySummary:
    if len(values) == 0:
        return LatencySummary(0, None, None, None, None, None)
    v = np.asarray(values, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    p50, p90, p99 = _percentiles(v, w, (50, 90, 99))
    count = int(w.sum()) if w is not None else len(v)
    mean = float(np.average(v, weights=w))
    return LatencySummary(count, mean, p50, p90, p99, float(v.max()))


def classification_metrics(pairs: Mapping[tuple[str, str], int]
                           ) -> tuple[float, float, ConfusionMatrix]:
    """Accuracy, macro F1 and the confusion matrix from ``{(true, predicted): rows}``.
    Macro F1 is the plain mean of the per-label F1 over every label seen as truth or as
    prediction; a label that is never predicted correctly scores 0. That is scikit-learn's
    ``f1_score(y, p, average="macro")`` with its defaults."""
    labels = tuple(sorted({t for t, _ in pairs} | {p for _, p in pairs}))
    index = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for (t, p), n in pairs.items():
        m[index[t], index[p]] += n
    total = int(m.sum())
    tp = np.diag(m).astype(np.float64)
    accuracy = float(tp.sum() / total) if total else 0.0
    true_n = m.sum(axis=1).astype(np.float64)
    pred_n = m.sum(axis=0).astype(np.float64)
    denom = true_n + pred_n  # 2TP / (2TP + FP + FN) == 2TP / (true + predicted)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    macro = float(f1.mean()) if len(labels) else 0.0
    return accuracy, macro, ConfusionMatrix(labels, tuple(tuple(int(x) for x in r) for r in m))


# ---- per-version accumulators --------------------------------------------------------------
class _Tally:
    def __init__(self, slot: Any, index: int) -> None:
        self.slot = slot
        self.index = index
        self.key = f"{slot.name}:{slot.version}"
        self.kind = slot.manifest.outputs.kind
        self.regressor = self.kind == "regressor"
        self.rows = 0
        self.errors = 0
        self.last_error: str | None = None
        self.counts: Counter[str] = Counter()
        self.pairs: Counter[tuple[str, str]] = Counter()
        self.labelled = 0
        self.batch_ms: list[float] = []
        self.batch_rows: list[int] = []
        self.v_n = 0
        self.v_sum = 0.0
        self.v_sq = 0.0
        self.v_min = float("inf")
        self.v_max = float("-inf")
        ref = getattr(slot.manifest, "reference", None)  # drift against the bundle's profile
        self.drift = None
        if ref:
            from edgeml.core.drift import SnapshotDrift

            spec = slot.manifest.input
            self.drift = SnapshotDrift(ref, spec.features, self.kind, spec.window,
                                       ref.get("hop"))

    def add_values(self, values: np.ndarray) -> None:
        v = values.astype(np.float64).ravel()
        if not len(v):
            return
        self.v_n += len(v)
        self.v_sum += float(v.sum())
        self.v_sq += float((v * v).sum())
        self.v_min = min(self.v_min, float(v.min()))
        self.v_max = max(self.v_max, float(v.max()))

    def report(self) -> VersionReport:
        accuracy = macro = confusion = None
        if self.pairs and not self.regressor:
            accuracy, macro, confusion = classification_metrics(self.pairs)
        values = None
        if self.regressor and self.v_n:
            mean = self.v_sum / self.v_n
            var = max(self.v_sq / self.v_n - mean * mean, 0.0)
            values = {"count": self.v_n, "mean": mean, "std": var ** 0.5,
                      "min": self.v_min, "max": self.v_max}
        distribution = None
        if not self.regressor:
            classes = [label_key(c) for c in (self.slot.classes or ())]
            ordered = [c for c in classes if c in self.counts]
            ordered += sorted(k for k in self.counts if k not in set(classes))
            distribution = {k: self.counts[k] for k in ordered}
        scoring_s = sum(self.batch_ms) / 1000.0
        per_row = [ms / n for ms, n in zip(self.batch_ms, self.batch_rows, strict=True)]
        return VersionReport(
            key=self.key, name=self.slot.name, version=self.slot.version, kind=self.kind,
            sha256=self.slot.manifest.sha256, rows=self.rows, errors=self.errors,
            last_error=self.last_error, distribution=distribution, values=values,
            latency_row_ms=latency_summary(per_row, self.batch_rows),
            latency_batch_ms=latency_summary(self.batch_ms),
            scoring_s=scoring_s, rows_per_s=(self.rows / scoring_s) if scoring_s > 0 else None,
            load_ms=self.slot.load_ms, labelled_rows=self.labelled, accuracy=accuracy,
            macro_f1=macro, confusion=confusion,
            drift=self.drift.figures() if self.drift is not None and self.drift.n else None,
        )


def _output_key(output: Mapping[str, Any]) -> Any:
    return output.get("label", output.get("value"))


# ---- the replay ----------------------------------------------------------------------------
def replay(records: Iterable[Any], assembler: Assembler, slots: Sequence[Any], *,
           batch: int = DEFAULT_BATCH, labels: Mapping[int, Any] | None = None,
           progress: Callable[[ReplayProgress], None] | None = None,
           on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> ReplayReport:
    """Feed archived records (:class:`~edgeml.storage.rawlog.RawRecord`, in archive order) through
    ``assembler`` and score every row with every slot, ``batch`` rows at a time.

    Records the decoder refuses are counted by reason and skipped, as the daemon dead-letters
    them. Slots that are not loaded yet are loaded here (which runs their self-test). True
    labels come from ``labels`` (keyed by the sequence number of the record that completed
    the row) when given, else from the payload's label field (``Row.label``). ``on_rows``
    receives, per batch, one dict per row with every version's output (see docs/replay.md).
    """
    if not slots:
        raise ReplayError("no model versions to replay through")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ReplayError(f"batch must be an integer >= 1, not {batch!r}")
    tallies = [_Tally(s, i) for i, s in enumerate(slots)]
    keys = [t.key for t in tallies]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ReplayError(f"{dup} is given twice; each version can be replayed once")
    for s in slots:
        if not s.ready:
            s.load()
    n = len(slots)
    agree = np.zeros((n, n), dtype=np.int64)
    both = np.zeros((n, n), dtype=np.int64)
    rejected: Counter[str] = Counter()
    state = {"records": 0, "rows": 0, "labelled": 0, "batches": 0}
    seqs: list[int | None] = [None, None]
    times: list[float | None] = [None, None]
    evicted0 = assembler.evicted_windows
    checked_width = False
    t_start = time.perf_counter()
    assemble_s = 0.0

    def score(rows: list[Row]) -> None:
        nonlocal checked_width
        x = np.stack([r.features for r in rows])
        if not checked_width:
            for s in slots:
                if s.row_width != x.shape[1]:
                    raise ReplayError(
                        f"{s.name} {s.version} takes rows of {s.row_width} floats; the "
                        f"pipeline's decoding and windowing make {x.shape[1]}")
            checked_width = True
        if labels is not None:
            truth = [label_key(labels.get(r.seq)) for r in rows]
        else:
            truth = [label_key(r.label) for r in rows]
        has_truth = [t is not None for t in truth]
        state["labelled"] += sum(has_truth)
        per_version: list[list[Any] | None] = []
        keyed: list[list[Any] | None] = []
        for t in tallies:
            try:
                pred = t.slot.predict(x)
                outputs = t.slot.outputs(pred)
            except (ModelError, ValueError, TypeError, IndexError) as exc:
                t.errors += len(rows)
                t.last_error = str(exc)
                per_version.append(None)
                keyed.append(None)
                continue
            t.rows += len(rows)
            if t.drift is not None:
                t.drift.add_rows(x)
                t.drift.add_outputs(pred.labels.tolist() if pred.labels is not None else None,
                                    pred.scores)
            t.batch_ms.append(pred.elapsed_ms)
            t.batch_rows.append(len(rows))
            per_version.append(outputs)
            raw = [_output_key(o) for o in outputs]
            if t.regressor:
                vals = np.asarray(raw, dtype=np.float64)
                t.add_values(vals)
                keyed.append(list(vals))
                continue
            ks = [label_key(v) for v in raw]
            keyed.append(ks)
            t.counts.update(ks)
            for tr, k in zip(truth, ks, strict=True):
                if tr is not None and k is not None:
                    t.pairs[(tr, k)] += 1
                    t.labelled += 1
        for i in range(n):
            if keyed[i] is None:
                continue
            both[i, i] += len(rows)
            agree[i, i] += len(rows)
            for j in range(i + 1, n):
                if keyed[j] is None or tallies[i].regressor != tallies[j].regressor:
                    continue
                if tallies[i].regressor:
                    same = int(np.isclose(np.asarray(keyed[i]), np.asarray(keyed[j]),
                                          rtol=REGRESSOR_RTOL, atol=REGRESSOR_ATOL).sum())
                else:
                    same = sum(a == b for a, b in zip(keyed[i], keyed[j], strict=True))
                both[i, j] += len(rows)
                agree[i, j] += same
        state["rows"] += len(rows)
        state["batches"] += 1
        if on_rows is not None:
            out = []
            for k, r in enumerate(rows):
                out.append({
                    "seq": r.seq, "row": r.sub, "id": r.id, "topic": r.topic,
                    "received": r.received, "label": truth[k],
                    "outputs": {t.key: (per_version[i][k] if per_version[i] is not None
                                        else None) for i, t in enumerate(tallies)},
                })
            on_rows(out)

    def tick(done: bool = False) -> None:
        if progress is not None:
            progress(ReplayProgress(state["records"], state["rows"], sum(rejected.values()),
                                    time.perf_counter() - t_start, seqs[1], done))

    pending: list[Row] = []
    since_tick = 0
    try:
        for rec in records:
            state["records"] += 1
            if seqs[0] is None:
                seqs[0] = rec.seq
                times[0] = times[1] = rec.received
            seqs[1] = rec.seq
            if rec.received < times[0]:  # type: ignore[operator]
                times[0] = rec.received
            if rec.received > times[1]:  # type: ignore[operator]
                times[1] = rec.received
            t0 = time.perf_counter()
            try:
                rows = assembler.feed(rec.topic, rec.payload, rec.seq, rec.received)
            except DecodeError as exc:
                rejected[exc.reason] += 1
                rows = []
            assemble_s += time.perf_counter() - t0
            if rows:
                pending.extend(rows)
                while len(pending) >= batch:
                    score(pending[:batch])
                    del pending[:batch]
                    tick()
                    since_tick = 0
            since_tick += 1
            if since_tick >= PROGRESS_EVERY_RECORDS:
                tick()
                since_tick = 0
        if pending:
            score(pending)
    except RawLogError as exc:
        raise ReplayError(f"reading the archive failed after {state['records']} records: "
                          f"{exc}") from exc
    elapsed = time.perf_counter() - t_start
    tick(done=True)
    agreement = tuple(
        tuple((float(agree[min(i, j), max(i, j)] / both[min(i, j), max(i, j)])
               if both[min(i, j), max(i, j)] else None) for j in range(n))
        for i in range(n))
    agreement_rows = tuple(tuple(int(both[min(i, j), max(i, j)]) for j in range(n))
                           for i in range(n))
    labels_source = None
    if state["labelled"]:
        labels_source = "labels" if labels is not None else "payload"
    return ReplayReport(
        records=state["records"], rejected=sum(rejected.values()),
        rejected_by_reason=dict(sorted(rejected.items())), rows=state["rows"],
        labelled_rows=state["labelled"], labels_source=labels_source,
        batches=state["batches"], batch_size=batch, first_seq=seqs[0], last_seq=seqs[1],
        first_received=times[0], last_received=times[1], elapsed_s=elapsed,
        assemble_s=assemble_s,
        records_per_s=(state["records"] / elapsed) if elapsed > 0 and state["records"] else None,
        rows_per_s=(state["rows"] / elapsed) if elapsed > 0 and state["rows"] else None,
        evicted_windows=assembler.evicted_windows - evicted0,
        versions=tuple(t.report() for t in tallies), agreement=agreement,
        agreement_rows=agreement_rows,
    )


# ---- bundles -> loaded slots ---------------------------------------------------------------
@contextlib.contextmanager
def open_slots(sources: Sequence[str | Path], *, profile: Any,
               store_root: Path | None = None) -> Iterator[list[Any]]:
    """Load every bundle as a :class:`~edgeml.core.model.LoadedModel` (session built from the
    firmware ``profile``, self-test run). A source is a bundle file, or ``NAME:VERSION`` of a
    model installed in the store at ``store_root`` (the device's ``data_dir/models``).
    Bundle files are checked (sha256) but need no signature: nothing here goes live."""
    from edgeml.bundle import read_bundle
    from edgeml.core.model import LoadedModel
    from edgeml.errors import BundleError, StoreError

    if not sources:
        raise ReplayError("give at least one bundle (a .edgeml file or NAME:VERSION)")
    with tempfile.TemporaryDirectory(prefix="edgeml-replay-") as tmp:
        slots: list[Any] = []
        for i, src in enumerate(sources):
            path = Path(src)
            try:
                if path.is_file():
                    bundle = read_bundle(path)
                    model_path = Path(tmp) / f"{i}.onnx"
                    model_path.write_bytes(bundle.model_bytes)
                    slot = LoadedModel(bundle.manifest, model_path, profile=profile)
                elif ":" in str(src) and store_root is not None and not path.exists():
                    from edgeml.storage.models import ModelStore

                    name, _, version = str(src).partition(":")
                    installed = ModelStore(store_root).get(name, version)
                    slot = LoadedModel.from_installed(installed, profile=profile)
                else:
                    hint = "" if store_root is None else \
                        f", nor NAME:VERSION of a model installed in {store_root}"
                    raise ReplayError(f"{src}: no such bundle file{hint}")
                slot.load()
            except (BundleError, StoreError, ModelError) as exc:
                raise ReplayError(f"{src}: {exc}") from exc
            slots.append(slot)
        try:
            yield slots
        finally:
            for s in slots:
                s.unload()


# ---- presentation --------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _table(rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None,
           indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = right or [False] + [True] * (len(widths) - 1)
    out = []
    for r in rows:
        cells = [c.rjust(w) if right[i] else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def render_table(report: ReplayReport) -> str:
    """The report as aligned plain text for a terminal."""
    r = report
    lines = []
    src = r.source
    where = f"pipeline {src['pipeline']}, " if src.get("pipeline") else ""
    if src.get("snapshot_id"):
        where += f"snapshot {str(src['snapshot_id'])[:16]}, "
    span = (f"seq {r.first_seq}-{r.last_seq}, {_iso(r.first_received)} .. "
            f"{_iso(r.last_received)}" if r.first_seq is not None else "no records")
    lines.append(f"replay: {where}{r.records} records ({span})")
    rej = ""
    if r.rejected:
        rej = " (" + ", ".join(f"{n} {k}" for k, n in r.rejected_by_reason.items()) + ")"
    lab = f", {r.labelled_rows} labelled (from {r.labels_source})" if r.labels_source else \
        ", no labels"
    rate = f", {r.records_per_s:,.0f} records/s" if r.records_per_s else ""
    lines.append(f"  {r.rejected} rejected{rej}; {r.rows} rows in {r.batches} batch(es) of "
                 f"up to {r.batch_size}{lab}; {r.elapsed_s:.2f} s{rate}")
    lines.append("")
    vs = r.versions
    head = ["VERSION", "ROWS", "ERRORS"]
    if r.labels_source:
        head += ["ACCURACY", "MACRO F1"]
    if len(vs) > 1:
        head += [f"AGREE {vs[0].key}"]
    head += ["ROW p50 ms", "ROW p99 ms", "BATCH p50 ms", "BATCH p99 ms", "ROWS/S"]
    table = [head]
    for i, v in enumerate(vs):
        row = [v.key, str(v.rows), str(v.errors)]
        if r.labels_source:
            row += [_fmt(v.accuracy, ".4f"), _fmt(v.macro_f1, ".4f")]
        if len(vs) > 1:
            row += [_fmt(r.agreement[0][i], ".4f")]
        row += [_ms(v.latency_row_ms.p50), _ms(v.latency_row_ms.p99),
                _ms(v.latency_batch_ms.p50), _ms(v.latency_batch_ms.p99),
                f"{v.rows_per_s:,.0f}" if v.rows_per_s else "-"]
        table.append(row)
    lines += _table(table)
    errs = [v for v in vs if v.last_error]
    for v in errs:
        lines.append(f"  {v.key}: {v.errors} rows failed; last error: {v.last_error}")
    dist_versions = [v for v in vs if v.distribution is not None]
    if dist_versions:
        labels_all: list[str] = []
        for v in dist_versions:
            labels_all += [k for k in v.distribution or {} if k not in labels_all]
        lines += ["", "outputs (rows per label):"]
        t = [["LABEL", *(v.key for v in dist_versions)]]
        for lab in labels_all:
            t.append([lab, *(_count_share((v.distribution or {}).get(lab, 0), v.rows)
                             for v in dist_versions)])
        lines += _table(t)
    for v in vs:
        if v.values is not None:
            lines.append(f"  {v.key} values: " + ", ".join(
                f"{k} {_fmt(x, '.4g')}" for k, x in v.values.items()))
    drifted = [v for v in vs if v.drift]
    if drifted:  # the snapshot against each bundle's reference profile
        lines += ["", "drift against each bundle's reference (PSI; >= 0.25 significant, "
                      "0.1-0.25 moderate):"]
        chans = list(drifted[0].drift["inputs"])
        t = [["VERSION", "SAMPLES", *chans, "OUT label", "OUT score", "DRIFT"]]
        for v in drifted:
            d = v.drift
            flag = ", ".join(k for k in ("input_drift", "output_drift") if d[k]) or "-"
            t.append([v.key, str(d["samples"]),
                      *(_fmt(d["inputs"].get(c, {}).get("psi"), ".3f") for c in chans),
                      _fmt(d["outputs"].get("label_psi"), ".3f"),
                      _fmt(d["outputs"].get("score_psi"), ".3f"), flag])
        lines += _table(t)
    if len(vs) > 1:
        lines += ["", "agreement (share of the rows both scored with the same label):"]
        t = [["", *(v.key for v in vs)]]
        for i, v in enumerate(vs):
            t.append([v.key, *(_fmt(x, ".4f") for x in r.agreement[i])])
        lines += _table(t)
    for v in vs:
        if v.confusion is None:
            continue
        lines += ["", f"confusion {v.key} ({v.labelled_rows} labelled rows; "
                      "rows: true label, columns: predicted):"]
        c = v.confusion
        t = [["", *c.labels]]
        for lab, row in zip(c.labels, c.matrix, strict=True):
            t.append([lab, *(str(x) for x in row)])
        lines += _table(t)
    return "\n".join(lines) + "\n"


def _count_share(count: int, total: int) -> str:
    if not total:
        return str(count)
    return f"{count} ({100.0 * count / total:.1f}%)"


def render_chart(report: ReplayReport, path: str | Path) -> Path:
    """A PNG for people who would rather look than read: accuracy, macro F1 and agreement
    with the first version per version; the agreement matrix; row latency per version.
    Raises :class:`ChartUnavailableError` when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ChartUnavailableError(
            "matplotlib is not installed (pip install matplotlib, or edgeml[host])") from exc
    vs = report.versions
    keys = [v.key for v in vs]
    n = len(vs)
    fig = Figure(figsize=(max(12.0, 5.0 + 2.4 * n), 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.4, 1.0, 1.0])
    x = np.arange(n)
    series = [("agreement with " + keys[0], [report.agreement[0][i] for i in range(n)])]
    if report.labels_source:
        series = [("accuracy", [v.accuracy for v in vs]),
                  ("macro F1", [v.macro_f1 for v in vs]), *series]
    width = 0.8 / len(series)
    for k, (name, vals) in enumerate(series):
        ys = [np.nan if y is None else y for y in vals]
        bars = ax1.bar(x + (k - (len(series) - 1) / 2) * width, ys, width, label=name)
        ax1.bar_label(bars, labels=["-" if y is None else f"{y:.3f}" for y in vals],
                      fontsize=7, padding=1)
    ax1.set_xticks(x, keys, rotation=20 if n > 3 else 0)
    ax1.set_ylim(0, 1.3)
    ax1.set_yticks(np.linspace(0, 1, 6))
    ax1.set_ylabel("share of rows")
    ax1.set_title(("accuracy and agreement" if report.labels_source else "agreement")
                  + f" ({report.rows} rows)")
    ax1.legend(fontsize=7, loc="upper center", ncol=len(series), frameon=False)
    mat = np.array([[np.nan if a is None else a for a in row] for row in report.agreement],
                   dtype=float).reshape(n, n)
    im = ax2.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            val = report.agreement[i][j]
            ax2.text(j, i, "-" if val is None else f"{val:.3f}", ha="center", va="center",
                     fontsize=8, color="white" if (val or 0) < 0.6 else "black")
    ax2.set_xticks(range(n), keys, rotation=20 if n > 2 else 0)
    ax2.set_yticks(range(n), keys)
    ax2.set_title("pairwise agreement")
    fig.colorbar(im, ax=ax2, shrink=0.8)
    p50 = [v.latency_row_ms.p50 or 0.0 for v in vs]
    p99 = [v.latency_row_ms.p99 or 0.0 for v in vs]
    ax3.bar(x - 0.2, p50, 0.4, label="p50")
    ax3.bar(x + 0.2, p99, 0.4, label="p99")
    ax3.set_xticks(x, keys, rotation=20 if n > 3 else 0)
    ax3.set_ylabel("ms per row")
    ax3.set_title(f"ms per row, batches of {report.batch_size}")
    ax3.legend(fontsize=7)
    out = Path(path)
    try:
        fig.savefig(out, format="png")
    except OSError as exc:
        raise ReplayError(f"{out}: cannot write the chart: {exc.strerror}") from exc
    return out


def write_json(report: ReplayReport, path: str | Path) -> Path:
    """The report as JSON (every figure), written atomically."""
    from edgeml.storage.fs import atomic_write

    out = Path(path)
    try:
        atomic_write(out, (json.dumps(report.to_dict(), indent=2, default=_jsonable) + "\n")
                     .encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise ReplayError(f"{out}: cannot write: {exc.strerror}") from exc
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
