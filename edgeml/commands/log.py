"""``edgeml log``: list, read, snapshot, verify and export the raw-input archive.

Everything here reads through :func:`edgeml.storage.rawlog.open_reader`, which never modifies
a file, so it is safe while the daemon runs. Only ``snapshot`` may write (a seal), and only when no
daemon holds the log.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

HELP = "read the raw-input archive: ls, cat, snapshot, verify, export"
DESCRIPTION = """\
Read the raw-input archive that the daemon keeps under DATA_DIR/rawlog/<pipeline>/.

  edgeml log ls --data-dir /var/lib/edgeml
  edgeml log cat --data-dir /var/lib/edgeml --pipeline activity --from-seq 1000 --limit 5
  edgeml log snapshot --data-dir /var/lib/edgeml --pipeline activity -o week42.json
  edgeml log verify --data-dir /var/lib/edgeml week42.json
  edgeml log export --data-dir /var/lib/edgeml --pipeline activity --config edgeml.toml \\
      --format csv -o activity.csv

Times (--since/--until) are ISO 8601 (UTC when no offset is given) or unix epoch seconds.
See docs/rawlog.md for the file format and the snapshot manifest.
"""


# ---- argument types ------------------------------------------------------------------------
def parse_time(text: str) -> float:
    """ISO 8601 (naive = UTC) or epoch seconds -> epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time or epoch seconds: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def parse_seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a sequence number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"sequence numbers are >= 0, not {value}")
    return value


def parse_positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


# ---- parser --------------------------------------------------------------------------------
def _data_dir(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--data-dir", type=Path, required=required, metavar="DIR",
                   help="the daemon's data directory (the archive is DIR/rawlog/<pipeline>/)"
                   + ("" if required else "; default: data_dir from --config"))


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-seq", type=parse_seq, metavar="N",
                   help="first sequence number to include")
    p.add_argument("--to-seq", type=parse_seq, metavar="N",
                   help="last sequence number to include (inclusive)")
    p.add_argument("--since", type=parse_time, metavar="TIME",
                   help="only records received at or after TIME (ISO 8601 or epoch seconds)")
    p.add_argument("--until", type=parse_time, metavar="TIME",
                   help="only records received before TIME (ISO 8601 or epoch seconds)")
    p.add_argument("--topic", metavar="TOPIC",
                   help="only records from this topic (an MQTT filter with + and # works)")
    p.add_argument("--limit", type=parse_positive, metavar="N", help="stop after N records")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="log_command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", help="list segments: seq ranges, sizes, time spans, seals",
                       description="List every pipeline's segments (or one pipeline's).")
    _data_dir(p)
    p.add_argument("--pipeline", metavar="P", help="only this pipeline (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(_log=_ls)

    p = sub.add_parser(
        "cat", help="print records as JSON lines",
        description="Print records as JSON lines: seq, received (ISO and epoch), topic, "
        "segment and the payload: as text when it is UTF-8 JSON (payload_encoding "
        "'utf-8'), else base64 (payload_encoding 'base64').")
    _data_dir(p)
    p.add_argument("--pipeline", required=True, metavar="P", help="the pipeline to read")
    _filters(p)
    p.set_defaults(_log=_cat)

    p = sub.add_parser(
        "snapshot", help="write a manifest citing sealed segments and their sha256",
        description="Write a snapshot manifest (a data version): the sealed segments that "
        "hold the seq range, with their sha256. When no daemon has the log open, the open "
        "segment is sealed first so the snapshot includes the newest records; otherwise "
        "those stay out (the manifest says so in open_segment_excluded).")
    _data_dir(p)
    p.add_argument("--pipeline", required=True, metavar="P", help="the pipeline to cite")
    p.add_argument("--from-seq", type=parse_seq, metavar="N",
                   help="cite the segments from the one holding seq N (default: oldest)")
    p.add_argument("--to-seq", type=parse_seq, metavar="N",
                   help="cite the segments up to the one holding seq N (default: newest)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the manifest to FILE (default: standard output)")
    p.set_defaults(_log=_snapshot)

    p = sub.add_parser(
        "verify", help="check the archive against a snapshot manifest (exit 1 if it differs)",
        description="Recompute the sha256 of every segment a snapshot cites; exit 0 when all "
        "are present and unchanged, 1 with the list of missing/changed ones otherwise.")
    _data_dir(p)
    p.add_argument("manifest", type=Path, metavar="SNAPSHOT.json",
                   help="a manifest written by 'edgeml log snapshot'")
    p.add_argument("--pipeline", metavar="P",
                   help="check this pipeline's log (default: the pipeline the manifest names)")
    p.set_defaults(_log=_verify)

    p = sub.add_parser(
        "export", help="decoded features per sample, as CSV or JSON lines",
        description="Decode every archived payload with the pipeline's decoder (the daemon's "
        "own code) and write one row per sample: seq, received, topic, sample index, id, "
        "label and the features. Payloads that no longer decode are counted and skipped.")
    _data_dir(p, required=False)
    p.add_argument("--pipeline", required=True, metavar="P", help="the pipeline to export")
    p.add_argument("--config", required=True, type=Path, metavar="FILE",
                   help="the daemon's config file (for the pipeline's features and format)")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                   help="output format (default: csv)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write to FILE (default: standard output)")
    _filters(p)
    p.set_defaults(_log=_export)


def run(args: argparse.Namespace) -> int:
    try:
        return args._log(args)
    except BrokenPipeError:  # `edgeml log cat ... | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# ---- commands ------------------------------------------------------------------------------
def _reader(data_dir: Path, pipeline: str):
    from edgeml.errors import RawLogError
    from edgeml.storage.rawlog import list_pipelines, open_reader, pipeline_dir

    d = pipeline_dir(data_dir, pipeline)
    if not d.is_dir():
        known = list_pipelines(data_dir)
        hint = f" (pipelines here: {', '.join(known)})" if known else " (no pipelines here)"
        raise RawLogError(f"{data_dir}: no raw-input log for pipeline {pipeline!r}{hint}")
    return open_reader(d)


def _ls(args: argparse.Namespace) -> int:
    from edgeml.errors import RawLogError
    from edgeml.storage.rawlog import list_pipelines

    names = [args.pipeline] if args.pipeline else list_pipelines(args.data_dir)
    if not names:
        raise RawLogError(f"{args.data_dir}: no raw-input logs under {args.data_dir / 'rawlog'}")
    out = []
    for name in names:
        reader = _reader(args.data_dir, name)
        infos = reader.segments()
        firsts = [s.min_received for s in infos if s.min_received is not None]
        lasts = [s.max_received for s in infos if s.max_received is not None]
        last_seqs = [s.last_seq for s in infos if s.last_seq is not None]
        out.append({
            "pipeline": name, "directory": str(reader.directory),
            "segments": [s.to_dict() for s in infos],
            "records": sum(s.records for s in infos), "bytes": sum(s.bytes for s in infos),
            "first_seq": next((s.first_seq for s in infos if s.records), None),
            "last_seq": max(last_seqs) if last_seqs else None,
            "first_received": min(firsts) if firsts else None,
            "last_received": max(lasts) if lasts else None,
        })
    if args.json:
        json.dump({"data_dir": str(args.data_dir), "pipelines": out}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for p in out:
        span = (f"seq {p['first_seq']}-{p['last_seq']}" if p["last_seq"] is not None
                else "no records")
        print(f"{p['pipeline']}: {len(p['segments'])} segment(s), {p['records']} records, "
              f"{_size(p['bytes'])}, {span}, {iso(p['first_received']) or '-'} .. "
              f"{iso(p['last_received']) or '-'}  ({p['directory']})")
        rows = [("SEGMENT", "SEQS", "RECORDS", "BYTES", "FIRST RECEIVED", "LAST RECEIVED",
                 "STATE", "SHA256")]
        for s in p["segments"]:
            seqs = (f"{s['first_seq']}-{s['last_seq']}" if s["last_seq"] is not None
                    else f"{s['first_seq']}-")
            state = "sealed" if s["sealed"] else "open"
            if s["corrupt_records"]:
                state += f" ({s['corrupt_records']} corrupt)"
            rows.append((s["file"], seqs, str(s["records"]), str(s["bytes"]),
                         iso(s["first_received"]) or "-", iso(s["last_received"]) or "-",
                         state, (s["sha256"] or "-")[:16]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _records(args: argparse.Namespace, reader) -> Iterator:
    it = reader.read(start_seq=args.from_seq, end_seq=args.to_seq, since=args.since,
                     until=args.until, topic=args.topic)
    if args.limit is None:
        yield from it
        return
    for n, rec in enumerate(it, 1):
        yield rec
        if n >= args.limit:
            return


def payload_fields(payload: bytes) -> dict[str, str]:
    """The payload as text when it is UTF-8 JSON, else base64; the encoding is named."""
    try:
        text = payload.decode("utf-8")
        json.loads(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {"payload": base64.b64encode(payload).decode("ascii"),
                "payload_encoding": "base64"}
    return {"payload": text, "payload_encoding": "utf-8"}


def _cat(args: argparse.Namespace) -> int:
    reader = _reader(args.data_dir, args.pipeline)
    out = sys.stdout
    for rec in _records(args, reader):
        doc = {"seq": rec.seq, "received": iso(rec.received), "received_epoch": rec.received,
               "topic": rec.topic, "segment": rec.segment, **payload_fields(rec.payload)}
        out.write(json.dumps(doc, ensure_ascii=False) + "\n")
    out.flush()
    skipped = reader.stats["corrupt_records_skipped"]
    if skipped:
        print(f"edgeml log cat: {skipped} corrupt record(s) skipped (see the warnings)",
              file=sys.stderr)
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    from edgeml.storage.rawlog import RawLog, RawLogBusyError

    reader = _reader(args.data_dir, args.pipeline)
    try:  # no daemon running: seal the open segment so the snapshot has the newest records
        writer = RawLog(reader.directory, budget_bytes=None, max_age_s=None)
    except RawLogBusyError:
        writer = None
        print("edgeml log snapshot: the log is open by a running daemon; its open segment "
              "stays out of the snapshot", file=sys.stderr)
    try:
        manifest = (writer or reader).snapshot(start_seq=args.from_seq, end_seq=args.to_seq)
    finally:
        if writer is not None:
            writer.close()
    text = json.dumps(manifest, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write_text(args.output, text)
    print(f"snapshot {manifest['id'][:16]}: {len(manifest['segments'])} segment(s), seqs "
          f"{manifest['first_seq']}-{manifest['last_seq']}, {manifest['records']} records"
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def _write_text(path: Path, text: str) -> None:
    from edgeml.errors import RawLogError
    from edgeml.storage.fs import atomic_write

    try:
        atomic_write(path, text.encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise RawLogError(f"{path}: cannot write: {exc.strerror}") from exc


def _verify(args: argparse.Namespace) -> int:
    from edgeml.errors import RawLogError
    from edgeml.storage.rawlog import pipeline_dir, read_manifest, verify_snapshot

    manifest = read_manifest(args.manifest)
    pipeline = args.pipeline or manifest.get("pipeline")
    if not isinstance(pipeline, str):
        raise RawLogError(f"{args.manifest}: snapshot manifest: pipeline: missing; "
                          "give --pipeline")
    directory = pipeline_dir(args.data_dir, pipeline)
    report = verify_snapshot(directory, manifest)
    if report.ok:
        print(f"ok: snapshot {manifest['id'][:16]} ({report.checked} segment(s), "
              f"{manifest.get('records', '?')} records) matches {directory}")
        return 0
    for line in report.problems:
        print(f"FAILED {line}")
    print(f"edgeml log verify: {args.manifest} does not match {directory}: "
          f"{len(report.missing)} missing, {len(report.changed)} changed of {report.checked} "
          "segment(s)", file=sys.stderr)
    return 1


def _export(args: argparse.Namespace) -> int:
    import csv

    from edgeml.config import load_config
    from edgeml.core.decode import Decoder
    from edgeml.errors import DecodeError, RawLogError

    config = load_config(args.config)
    pcfg = config.pipeline(args.pipeline)
    reader = _reader(args.data_dir or config.data_dir, args.pipeline)
    decoder = Decoder.from_pipeline(pcfg)
    meta_cols = ["seq", "received", "received_epoch", "topic", "sample", "id", "label"]
    names: list[str] | None = list(pcfg.features) if pcfg.features else None
    fh: IO[str] = sys.stdout
    if args.output is not None:
        try:
            fh = open(args.output, "w", encoding="utf-8", newline="")  # noqa: SIM115
        except OSError as exc:
            raise RawLogError(f"{args.output}: cannot write: {exc.strerror}") from exc
    rows = skipped = 0
    reasons: dict[str, int] = {}
    try:
        writer: Any = csv.writer(fh) if args.format == "csv" else None
        if writer is not None and names is not None:
            writer.writerow([*meta_cols, *names])
        for rec in _records(args, reader):
            try:
                dec = decoder.decode(rec.payload)
            except DecodeError as exc:
                skipped += 1
                reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
                continue
            if names is None:  # an array field: name the columns field[0], field[1], ...
                names = [f"{pcfg.field}[{i}]" for i in range(dec.samples.shape[1])]
                if writer is not None:
                    writer.writerow([*meta_cols, *names])
            received = iso(rec.received)
            for k in range(dec.samples.shape[0]):
                values = [str(v) for v in dec.samples[k]]  # float32's shortest repr
                sid = dec.ids[k] if k < len(dec.ids) else None
                label = dec.labels[k] if dec.labels is not None else None
                if writer is not None:
                    writer.writerow([rec.seq, received, rec.received, rec.topic, k,
                                     "" if sid is None else sid,
                                     "" if label is None else label, *values])
                else:
                    fh.write(json.dumps({
                        "seq": rec.seq, "received": received, "received_epoch": rec.received,
                        "topic": rec.topic, "sample": k, "id": sid, "label": label,
                        "features": dict(zip(names, map(float, values), strict=True)),
                    }, ensure_ascii=False) + "\n")
                rows += 1
    finally:
        if fh is not sys.stdout:
            fh.close()
        else:
            fh.flush()
    msg = f"exported {rows} sample(s)"
    if skipped:
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        msg += f"; {skipped} record(s) skipped: payload no longer decodes ({why})"
    print(f"edgeml log export: {msg}" + (f" -> {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0
