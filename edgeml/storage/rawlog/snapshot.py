"""Versioned data: a snapshot manifest cites sealed segments by name and sha256, so a range
of the archive is a data version that can be cited (``edgeml log snapshot``) and checked
later (``edgeml log verify``, ``edgeml replay --snapshot``)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import RawLogError
from edgeml.storage.rawlog.format import (
    FORMAT_VERSION,
    SEGMENT_RE,
    SNAPSHOT_FORMAT,
    SegmentInfo,
    _sha256_file,
)


@dataclass(frozen=True)
class VerifyReport:
    """Result of checking an archive against a snapshot manifest."""

    ok: bool
    checked: int
    missing: tuple[str, ...]
    changed: tuple[str, ...]
    problems: tuple[str, ...]


def _snapshot_id(segments: Sequence[Mapping[str, Any]]) -> str:
    """The data version: sha256 over ``"<file> <sha256>\\n"`` of every cited segment."""
    text = "".join(f"{s['file']} {s['sha256']}\n" for s in segments)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_manifest(directory: Path, infos: Sequence[SegmentInfo], start_seq: int | None,
                   end_seq: int | None) -> dict[str, Any]:
    """The manifest citing the sealed segments among ``infos`` (a log's segment list) that
    hold seqs in ``[start_seq, end_seq]``; the open segment is named as excluded."""
    chosen = [s for s in infos if s.sealed and s.records > 0 and s.last_seq is not None
              and (end_seq is None or s.first_seq <= end_seq)
              and (start_seq is None or s.last_seq >= start_seq)]
    open_seg = next((s for s in infos if not s.sealed and s.records > 0), None)
    if not chosen:
        rng = f"{start_seq if start_seq is not None else 'start'}-" \
              f"{end_seq if end_seq is not None else 'end'}"
        raise RawLogError(f"{directory}: no sealed segment holds records in seq "
                          f"range {rng}")
    segs = [{
        "file": s.name, "first_seq": s.first_seq, "last_seq": s.last_seq,
        "records": s.records, "bytes": s.bytes, "sha256": s.sha256,
        "first_received": s.first_received, "last_received": s.last_received,
    } for s in chosen]
    mins = [s.min_received for s in chosen if s.min_received is not None]
    maxs = [s.max_received for s in chosen if s.max_received is not None]
    now = time.time()
    return {
        "format": SNAPSHOT_FORMAT,
        "version": FORMAT_VERSION,
        "id": _snapshot_id(segs),
        "pipeline": directory.name,
        "directory": str(directory.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "created_epoch": now,
        "range": {"start_seq": start_seq, "end_seq": end_seq},
        "first_seq": chosen[0].first_seq,
        "last_seq": chosen[-1].last_seq,
        "records": sum(s.records for s in chosen),
        "bytes": sum(s.bytes for s in chosen),
        "first_received": min(mins) if mins else None,
        "last_received": max(maxs) if maxs else None,
        "segments": segs,
        "open_segment_excluded": (
            {"file": open_seg.name, "first_seq": open_seg.first_seq,
             "records": open_seg.records} if open_seg is not None
            and (end_seq is None or open_seg.first_seq <= end_seq) else None),
    }


def _manifest_error(key: str, problem: str) -> RawLogError:
    return RawLogError(f"snapshot manifest: {key}: {problem}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a snapshot manifest file (``edgeml log verify``, ``edgeml replay``)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RawLogError(f"{path}: cannot read the snapshot: {exc.strerror}") from exc
    except ValueError as exc:
        raise RawLogError(f"{path}: not valid JSON: {exc}") from exc
    try:
        check_manifest(manifest)
    except RawLogError as exc:
        raise RawLogError(f"{path}: {exc}") from None
    return manifest


def check_manifest(manifest: Any) -> list[dict[str, Any]]:
    """Validate a snapshot manifest's shape; returns its segment entries."""
    if not isinstance(manifest, dict):
        raise _manifest_error("(top level)", "must be a JSON object")
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise _manifest_error("format", f"must be {SNAPSHOT_FORMAT!r}, "
                              f"not {manifest.get('format')!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise _manifest_error("version", f"unsupported {manifest.get('version')!r} "
                              f"(this edgeml reads {FORMAT_VERSION})")
    segs = manifest.get("segments")
    if not isinstance(segs, list) or not segs:
        raise _manifest_error("segments", "must be a non-empty list")
    for i, s in enumerate(segs):
        if not isinstance(s, dict):
            raise _manifest_error(f"segments[{i}]", "must be an object")
        if not isinstance(s.get("file"), str) or not SEGMENT_RE.match(s["file"]):
            raise _manifest_error(f"segments[{i}].file", f"not a segment file name: "
                                  f"{s.get('file')!r}")
        sha = s.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise _manifest_error(f"segments[{i}].sha256", "must be 64 lowercase hex digits")
        if not isinstance(s.get("bytes"), int):
            raise _manifest_error(f"segments[{i}].bytes", "must be an integer")
    return segs


def verify_snapshot(directory: str | Path, manifest: Mapping[str, Any]) -> VerifyReport:
    """Check that every segment the manifest cites is in ``directory`` with the same bytes."""
    segs = check_manifest(manifest)
    d = Path(directory)
    missing: list[str] = []
    changed: list[str] = []
    problems: list[str] = []
    if manifest.get("id") != _snapshot_id(segs):
        problems.append("manifest id does not match its segment list (the manifest was edited)")
    for s in segs:
        path = d / s["file"]
        try:
            size = path.stat().st_size
            digest = _sha256_file(path)
        except FileNotFoundError:
            missing.append(s["file"])
            problems.append(f"{s['file']}: missing (removed by retention, or the wrong archive)")
            continue
        except OSError as exc:
            missing.append(s["file"])
            problems.append(f"{s['file']}: unreadable: {exc.strerror}")
            continue
        if digest != s["sha256"] or size != s["bytes"]:
            changed.append(s["file"])
            problems.append(f"{s['file']}: changed (sha256 {digest[:16]}..., {size} bytes; "
                            f"snapshot has {s['sha256'][:16]}..., {s['bytes']} bytes)")
    return VerifyReport(ok=not problems, checked=len(segs), missing=tuple(missing),
                        changed=tuple(changed), problems=tuple(problems))
