"""``edgeml replay``: run archived inputs through candidate bundles and compare them.

Offline: it reads the raw-input archive from the data directory (no broker), decodes and
windows it with the daemon's own code (:class:`edgeml.core.assemble.Assembler`), and reports per
bundle. The work is in :mod:`edgeml.host.replay`; this module wires files and flags to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

HELP = "run archived inputs through bundles offline and compare them (agreement, accuracy)"
DESCRIPTION = """\
Run the raw-input archive of a pipeline through one or more bundles, offline, with the same
decoding and windowing code as the live daemon, and compare them: output distribution,
pairwise agreement, latency, and accuracy / macro F1 / confusion when labels are known.

  # is iteration 15 better than 14 on last week's data?
  edgeml replay --data-dir /var/lib/edgeml --pipeline activity \\
      --since 2025-03-03 --until 2025-03-10 activity-14.edgeml activity-15.edgeml \\
      --json week10.json --chart week10.png

  # exactly the data version a snapshot manifest names (refused if the archive changed)
  edgeml replay --data-dir /var/lib/edgeml --snapshot week10-snap.json \\
      activity:14 activity-15.edgeml --labels week10-labels.csv

A BUNDLE is a .edgeml file, or NAME:VERSION of a model installed in DATA_DIR/models.
Decoding and windowing come from the daemon's config (--config, the pipeline named by
--pipeline) or, without a config, from the first bundle's manifest (its input features,
windows of input.window samples with hop = window, format auto). See docs/replay.md.
"""


def _positive(text: str) -> int:
    from edgeml.commands.log import parse_positive  # one syntax for log and replay

    return parse_positive(text)


def _seq(text: str) -> int:
    from edgeml.commands.log import parse_seq

    return parse_seq(text)


def _time(text: str) -> float:
    from edgeml.commands.log import parse_time  # one time syntax for log and replay

    return parse_time(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE",
                        help="a .edgeml bundle file, or NAME:VERSION of a model installed in "
                        "DATA_DIR/models; give two or more to compare them (the first is the "
                        "reference for the 'AGREE' column)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="the daemon's data directory (the archive is "
                        "DIR/rawlog/<pipeline>/); default: data_dir from --config")
    parser.add_argument("--pipeline", metavar="P",
                        help="the pipeline whose archive to replay (default: the snapshot's)")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="the daemon's config: decoding and windowing of pipeline P come "
                        "from it (default: from the first bundle's manifest)")
    parser.add_argument("--snapshot", type=Path, metavar="SNAP.json",
                        help="replay exactly the segments this snapshot manifest cites (from "
                        "'edgeml log snapshot'); it is verified first and a changed archive "
                        "is refused")
    parser.add_argument("--from-seq", type=_seq, metavar="N",
                        help="first sequence number to replay")
    parser.add_argument("--to-seq", type=_seq, metavar="N",
                        help="last sequence number to replay (inclusive)")
    parser.add_argument("--since", type=_time, metavar="TIME",
                        help="only records received at or after TIME (ISO 8601, UTC when no "
                        "offset is given, or epoch seconds)")
    parser.add_argument("--until", type=_time, metavar="TIME",
                        help="only records received before TIME (ISO 8601 or epoch seconds)")
    parser.add_argument("--topic", metavar="TOPIC",
                        help="only records from this topic (an MQTT filter with + and # works)")
    parser.add_argument("--labels", type=Path, metavar="FILE",
                        help="true labels keyed by sequence number: CSV 'seq,label' or JSON "
                        "{\"<seq>\": label}; replaces labels found in the payloads")
    parser.add_argument("--label-field", metavar="NAME",
                        help="payload field that holds the true label (default: the config's "
                        "label_field, else 'label')")
    parser.add_argument("--batch", type=_positive, default=256, metavar="N",
                        help="rows per onnxruntime call (default: 256)")
    parser.add_argument("--profile", metavar="P",
                        help="firmware profile for the onnxruntime sessions: a shipped name or "
                        "a .toml path (default: the config's profile, else x86-gateway)")
    parser.add_argument("--json", type=Path, metavar="OUT.json", dest="json_out",
                        help="write the whole report as JSON")
    parser.add_argument("--chart", type=Path, metavar="OUT.png",
                        help="write a PNG chart: accuracy and agreement per version, the "
                        "agreement matrix, latency (needs matplotlib; skipped if missing)")
    parser.add_argument("--rows", type=Path, metavar="OUT.jsonl",
                        help="write every row's outputs, one JSON line per row: seq, row, id, "
                        "topic, received, label and each version's output")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress and no summary on stderr (the table still prints)")


# ---- progress ------------------------------------------------------------------------------
class ProgressPrinter:
    """Progress on stderr: a line every ``interval`` seconds, or a bar redrawn in place
    (at most 10 times a second) when the stream is a terminal."""

    def __init__(self, stream: IO[str], total: int | None, *, tty: bool | None = None,
                 interval: float = 2.0, clock: Any = time.monotonic) -> None:
        self.stream = stream
        self.total = total
        self.tty = stream.isatty() if tty is None else tty
        self.interval = 0.1 if self.tty else interval
        self.clock = clock
        self._last = clock()
        self._drawn = False
        self.lines = 0

    def __call__(self, p: Any) -> None:
        now = self.clock()
        if not p.done and now - self._last < self.interval:
            return
        self._last = now
        if p.done and not self._drawn:
            return  # a short replay: the summary line says it all
        self._drawn = True
        rate = p.records / p.elapsed_s if p.elapsed_s > 0 else 0.0
        frac = None
        if self.total:
            frac = min(p.records / self.total, 1.0)
        eta = ""
        if frac is not None and rate > 0 and not p.done:
            eta = f", ETA {_duration((self.total - p.records) / rate)}"
        counts = (f"{p.records:,}" + (f"/{self.total:,}" if self.total else "")
                  + f" records, {p.rows:,} rows"
                  + (f", {p.rejected:,} rejected" if p.rejected else "")
                  + f", {rate:,.0f} records/s{eta}")
        if self.tty:
            bar = ""
            if frac is not None:
                filled = int(frac * 30)
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {frac * 100:5.1f}% "
            self.stream.write(f"\r{bar}{counts}\033[K" + ("\n" if p.done else ""))
        else:
            pct = f" ({frac * 100:.0f}%)" if frac is not None else ""
            self.stream.write(f"replay: {counts}{pct}\n")
        self.lines += 1
        self.stream.flush()


def _duration(s: float) -> str:
    s = max(0, int(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


# ---- the command ---------------------------------------------------------------------------
def _load_snapshot(path: Path) -> dict:
    from edgeml.errors import RawLogError, ReplayError
    from edgeml.storage.rawlog import read_manifest

    try:
        return read_manifest(path)
    except RawLogError as exc:
        raise ReplayError(str(exc)) from exc


def _pipeline_config(args: argparse.Namespace, config: Any, pipeline: str, slots: list) -> Any:
    """The decoding/windowing settings: the daemon's pipeline, or derived from the manifest."""
    from dataclasses import replace

    from edgeml.config import PipelineConfig, WindowConfig

    if config is not None:
        pcfg = config.pipeline(pipeline)
    else:
        spec = slots[0].manifest.input
        window = WindowConfig(size=spec.window, hop=spec.window) if spec.window else None
        pcfg = PipelineConfig(name=pipeline, topics=("#",), format="auto",
                              features=tuple(spec.features), window=window)
    if args.label_field is not None:
        pcfg = replace(pcfg, label_field=args.label_field or None)
    return pcfg


def _estimate_total(reader: Any, lo: int | None, hi: int | None) -> int | None:
    """Records in [lo, hi] from the segment list (seqs are dense), for the progress bar."""
    segs = [s for s in reader.segments() if s.records and s.last_seq is not None]
    if not segs:
        return None
    first = max(segs[0].first_seq, lo if lo is not None else 0)
    last = min(segs[-1].last_seq, hi if hi is not None else segs[-1].last_seq)
    return max(0, last - first + 1)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgeml.config import load_config
    from edgeml.control.registry import check_compatible
    from edgeml.core.assemble import Assembler
    from edgeml.core.decode import Decoder
    from edgeml.errors import ChartUnavailableError, EdgemlError, ReplayError, SnapshotMismatchError
    from edgeml.host.replay import (
        open_slots,
        read_labels,
        render_chart,
        render_table,
        replay,
        write_json,
    )
    from edgeml.profiles import DEFAULT_PROFILE, load_profile
    from edgeml.storage.rawlog import list_pipelines, open_reader, pipeline_dir, verify_snapshot

    config = load_config(args.config) if args.config is not None else None
    snapshot = _load_snapshot(args.snapshot) if args.snapshot is not None else None
    pipeline = args.pipeline
    if snapshot is not None:
        snap_pipe = snapshot.get("pipeline")
        if pipeline is None:
            pipeline = snap_pipe
        elif snap_pipe is not None and snap_pipe != pipeline:
            raise ReplayError(f"{args.snapshot}: the snapshot is of pipeline {snap_pipe!r}, "
                              f"not {pipeline!r}")
    if not pipeline:
        raise ReplayError("--pipeline: required (which pipeline's archive to replay)")
    data_dir = args.data_dir or (config.data_dir if config is not None else None)
    if data_dir is None:
        raise ReplayError("--data-dir: required (or give --config with a data_dir)")
    directory = pipeline_dir(data_dir, pipeline)
    if not directory.is_dir():
        known = list_pipelines(data_dir)
        hint = f" (pipelines here: {', '.join(known)})" if known else " (no archive here)"
        raise ReplayError(f"{data_dir}: no raw-input log for pipeline {pipeline!r}{hint}")
    lo, hi = args.from_seq, args.to_seq
    cited: set[str] | None = None
    if snapshot is not None:
        check = verify_snapshot(directory, snapshot)
        if not check.ok:
            raise SnapshotMismatchError(
                f"{args.snapshot}: the archive in {directory} no longer matches snapshot "
                f"{str(snapshot.get('id'))[:16]}; replay refused: " + "; ".join(check.problems))
        cited = {s["file"] for s in snapshot["segments"]}
        first, last = snapshot.get("first_seq"), snapshot.get("last_seq")
        if isinstance(first, int):
            lo = first if lo is None else max(lo, first)
        if isinstance(last, int):
            hi = last if hi is None else min(hi, last)
    labels = read_labels(args.labels) if args.labels is not None else None
    profile_name = args.profile or (config.profile if config is not None else DEFAULT_PROFILE)
    profile = load_profile(profile_name)
    quiet = args.quiet
    with open_slots(args.bundles, profile=profile, store_root=Path(data_dir) / "models") as slots:
        pcfg = _pipeline_config(args, config, pipeline, slots)
        for s in slots:
            try:
                check_compatible(pcfg, s.manifest)
            except EdgemlError as exc:
                src = (f"config {args.config}" if config is not None
                       else f"manifest of {slots[0].name} {slots[0].version}")
                raise ReplayError(f"{exc} (pipeline settings from the {src})") from None
        n_features = slots[0].manifest.input.n_features if pcfg.field is not None else None
        assembler = Assembler(Decoder.from_pipeline(pcfg, n_features), pcfg.window)
        reader = open_reader(directory)
        records = reader.read(start_seq=lo, end_seq=hi, since=args.since, until=args.until,
                              topic=args.topic)
        if cited is not None:
            records = (r for r in records if r.segment in cited)
        narrowed = any(v is not None for v in (args.from_seq, args.to_seq, args.since,
                                               args.until, args.topic))
        total = (snapshot.get("records") if snapshot is not None and not narrowed
                 else None if args.since or args.until or args.topic
                 else _estimate_total(reader, lo, hi))
        printer = None if quiet else ProgressPrinter(sys.stderr, total)
        rows_fh = None
        on_rows = None
        if args.rows is not None:
            try:
                rows_fh = open(args.rows, "w", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ReplayError(f"{args.rows}: cannot write: {exc.strerror}") from exc

            def on_rows(batch: list[dict]) -> None:
                for row in batch:
                    rows_fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        try:
            report = replay(records, assembler, slots, batch=args.batch, labels=labels,
                            progress=printer, on_rows=on_rows)
        finally:
            if rows_fh is not None:
                rows_fh.close()
        skipped = reader.stats.get("corrupt_records_skipped", 0)
    if snapshot is not None:
        if not narrowed and report.records != snapshot.get("records"):
            raise SnapshotMismatchError(
                f"{args.snapshot}: read {report.records} records from the cited segments, the "
                f"snapshot holds {snapshot.get('records')} (the archive changed during replay)")
        again = verify_snapshot(directory, snapshot)
        if not again.ok:
            raise SnapshotMismatchError(f"{args.snapshot}: the archive changed during the "
                                        "replay: " + "; ".join(again.problems))
    source = {
        "data_dir": str(data_dir), "pipeline": pipeline, "directory": str(directory),
        "config": str(args.config) if args.config else None,
        "settings_from": "config" if config is not None else "manifest",
        "format": pcfg.format, "features": list(pcfg.features) if pcfg.features else None,
        "field": pcfg.field, "label_field": pcfg.label_field,
        "window": ({"size": pcfg.window.size, "hop": pcfg.window.hop} if pcfg.window
                   else None),
        "snapshot": str(args.snapshot) if args.snapshot else None,
        "snapshot_id": snapshot.get("id") if snapshot is not None else None,
        "filters": {"from_seq": args.from_seq, "to_seq": args.to_seq, "since": args.since,
                    "until": args.until, "topic": args.topic},
        "labels_file": str(args.labels) if args.labels else None,
        "bundles": [str(b) for b in args.bundles], "profile": profile.name,
        "corrupt_records_skipped": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report = replace(report, source=source)
    sys.stdout.write(render_table(report))
    sys.stdout.flush()
    notes = []
    if args.json_out is not None:
        write_json(report, args.json_out)
        notes.append(f"report -> {args.json_out}")
    if args.chart is not None:
        try:
            render_chart(report, args.chart)
            notes.append(f"chart -> {args.chart}")
        except ChartUnavailableError as exc:
            print(f"edgeml replay: {exc}; chart skipped", file=sys.stderr)
    if args.rows is not None:
        notes.append(f"rows -> {args.rows}")
    if report.records == 0:
        print("edgeml replay: no archived records matched (check the range and the "
              "pipeline)", file=sys.stderr)
    if skipped:
        print(f"edgeml replay: {skipped} corrupt record(s) skipped in the archive (see the "
              "warnings)", file=sys.stderr)
    if not quiet:
        print(f"edgeml replay: {report.records:,} records, {report.rows:,} rows, "
              f"{len(report.versions)} version(s) in {report.elapsed_s:.2f} s"
              + ("; " + ", ".join(notes) if notes else ""), file=sys.stderr)
    return 0
