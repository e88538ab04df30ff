"""``edgeml bench models``: what one bundle costs on a device class, per batch size.

A host run approximates a device class by applying the firmware profile to this process: the
profile's ``cpu_cores`` become a CPU affinity mask over the first N allowed cores, and the
sessions are built by :func:`edgeml.profiles.create_session` with the profile's thread,
arena and provider settings. It is an emulation, not the device: clock speed, cache, memory
bandwidth and the instruction set stay the host's, and the report says so.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import BenchError

Progress = Callable[[str], None]

DEFAULT_BATCHES: tuple[int, ...] = (1, 8, 64)



# --- memory -----------------------------------------------------------------------------------
def rss_bytes(pid: int | None = None) -> int:
    """Resident set size: psutil when installed, else VmRSS from /proc (Linux)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.Process(pid or os.getpid()).memory_info().rss)
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- profile emulation ------------------------------------------------------------------------
@dataclass(frozen=True)
class Emulation:
    """How the profile was applied to this process (reported verbatim)."""

    profile: str
    cpu_cores: int
    affinity: tuple[int, ...]
    host_cores: int
    intra_op_threads: int
    inter_op_threads: int
    providers: tuple[str, ...]
    note: str


@contextlib.contextmanager
def emulate_profile(profile: Any) -> Iterator[Emulation]:
    """Pin this process to the profile's core count for the duration, then restore the mask.

    Only the first N of the cores this process may use are kept, so a run inside a cgroup or
    under ``taskset`` stays inside it. Without ``sched_setaffinity`` (macOS) the core limit is
    not applied and the note says so.
    """
    want = int(profile.cpu_cores)
    ort = profile.onnxruntime
    original: set[int] | None = None
    if hasattr(os, "sched_getaffinity"):
        original = set(os.sched_getaffinity(0))
        keep = sorted(original)[:want]
        os.sched_setaffinity(0, keep)
        affinity = tuple(keep)
        host = len(original)
        limited = (f"pinned to {len(keep)} of {host} host cores"
                   if len(keep) < host else f"all {host} host cores (profile allows {want})")
    else:  # pragma: no cover - non-Linux
        affinity = ()
        host = os.cpu_count() or 0
        limited = "core limit NOT applied (no sched_setaffinity on this OS)"
    note = (f"emulation of the '{profile.name}' device class on this host: {limited}, "
            f"onnxruntime intra_op_threads={ort.intra_op_threads} "
            f"inter_op_threads={ort.inter_op_threads}; the host's clock speed, caches and "
            "instruction set still apply, so a real device is usually slower")
    try:
        yield Emulation(
            profile=profile.name, cpu_cores=want, affinity=affinity, host_cores=host,
            intra_op_threads=ort.intra_op_threads, inter_op_threads=ort.inter_op_threads,
            providers=tuple(ort.providers), note=note,
        )
    finally:
        if original is not None:
            os.sched_setaffinity(0, original)


# --- demo rows for a bundle --------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRows:
    """Rows exactly as the ONNX input takes them, and where they came from."""

    X: np.ndarray
    source: str


def rows_for_input(model_input: Any) -> BenchRows:
    """Real demo data shaped for ``model_input`` (a :class:`edgeml.bundle.ModelInput`).

    6 features -> BasicMotions TEST (windows of ``window`` samples, hop = window, so window 100
    gives the 40 TEST series); 9 features -> Daphnet samples (or windows of them). Any other
    feature count has no demo data: seeded normal noise, and the source says so.
    """
    from edgeml.host import datasets

    n_feat = len(model_input.features)
    window = model_input.window
    if n_feat == len(datasets.BASICMOTIONS_CHANNELS):
        series = datasets.load_basicmotions("TEST")
        samples = series.X.reshape(-1, n_feat)
        name = "BasicMotions TEST"
    elif n_feat == len(datasets.DAPHNET_CHANNELS):
        samples = datasets.load_daphnet().X
        name = "Daphnet S06R02E0"
    else:
        rng = np.random.default_rng(0)
        samples = rng.standard_normal((4096 * (window or 1), n_feat)).astype(np.float32)
        name = f"synthetic N(0,1) ({n_feat} features: no demo data set has that many)"
    if window:
        n = len(samples) // window
        X = samples[: n * window].reshape(n, window, n_feat)
        source = f"{name}: {n} windows of {window} samples (hop {window})"
    else:
        X = samples
        source = f"{name}: {len(X)} single samples"
    if len(model_input.shape) != 3:
        X = X.reshape(len(X), -1)
    return BenchRows(X=np.ascontiguousarray(X, dtype=np.float32), source=source)


# --- timing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchTiming:
    batch: int
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    rows_per_s: float
    us_per_row: float
    rss_growth_bytes: int


def _batches(X: np.ndarray, batch: int, count: int = 16) -> list[np.ndarray]:
    """``count`` distinct batches cycling through the rows (real values, not one repeated row)."""
    idx = (np.arange(batch * count) % len(X)).reshape(count, batch)
    return [np.ascontiguousarray(X[i]) for i in idx]


def time_session(session: Any, X: np.ndarray, batch: int, *, seconds: float = 1.0,
                 min_calls: int = 20, warmup: int = 3, max_calls: int = 1 << 20) -> BatchTiming:
    """Call ``session.run`` on real batches for about ``seconds``; per-call percentiles."""
    name = session.get_inputs()[0].name
    feeds = _batches(X, batch)
    for i in range(warmup):
        session.run(None, {name: feeds[i % len(feeds)]})
    # the timing buffer is allocated and touched before the RSS baseline, so a million tiny
    # calls do not show up as "RSS growth" of the model
    times = np.zeros(max_calls, dtype=np.int64)
    times.fill(1)
    rss0 = rss_bytes()
    t_end = time.perf_counter() + seconds
    i = 0
    perf = time.perf_counter_ns
    while i < max_calls and (i < min_calls or time.perf_counter() < t_end):
        x = feeds[i % len(feeds)]
        t = perf()
        session.run(None, {name: x})
        times[i] = perf() - t
        i += 1
    growth = rss_bytes() - rss0
    arr = times[:i].astype(np.float64) / 1e6
    total = float(arr.sum()) / 1000.0
    return BatchTiming(
        batch=batch, calls=len(arr), seconds=total,
        p50_ms=float(np.percentile(arr, 50)), p99_ms=float(np.percentile(arr, 99)),
        max_ms=float(arr.max()),
        rows_per_s=batch * len(arr) / total if total > 0 else 0.0,
        us_per_row=total * 1e6 / (batch * len(arr)) if arr.size else 0.0,
        rss_growth_bytes=growth,
    )


@dataclass(frozen=True)
class ModelBench:
    bundle: str
    name: str
    version: str
    kind: str
    input_shape: tuple
    data: str
    model_bytes: int
    load_ms: float
    first_call_ms: float
    rss_before_bytes: int
    rss_loaded_bytes: int
    rss_after_bytes: int
    batches: tuple[BatchTiming, ...]

    @property
    def rss_load_growth_bytes(self) -> int:
        return self.rss_loaded_bytes - self.rss_before_bytes


def bench_bundle(path: Path, profile: Any, *, batches: Sequence[int] = DEFAULT_BATCHES,
                 seconds: float = 1.0, progress: Progress | None = None) -> ModelBench:
    """Load ``path`` with ``profile``'s session settings and time it at each batch size."""
    from edgeml.bundle import read_bundle
    from edgeml.profiles import create_session

    bundle = read_bundle(Path(path))
    m = bundle.manifest
    rows = rows_for_input(m.input)
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    session = create_session(bundle.model_bytes, profile)
    load_ms = (time.perf_counter() - t0) * 1000
    x1 = rows.X[:1]
    t1 = time.perf_counter()
    session.run(None, {session.get_inputs()[0].name: x1})
    first_ms = (time.perf_counter() - t1) * 1000
    rss_loaded = rss_bytes()
    timings = []
    for b in batches:
        if progress:
            progress(f"{m.name} {m.version}: batch {b} for {seconds:g} s")
        timings.append(time_session(session, rows.X, int(b), seconds=seconds))
    rss_after = rss_bytes()
    del session
    gc.collect()
    return ModelBench(
        bundle=str(path), name=m.name, version=m.version, kind=m.outputs.kind,
        input_shape=tuple(m.input.shape), data=rows.source, model_bytes=len(bundle.model_bytes),
        load_ms=load_ms, first_call_ms=first_ms, rss_before_bytes=rss0,
        rss_loaded_bytes=rss_loaded, rss_after_bytes=rss_after, batches=tuple(timings),
    )


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``; every size a positive integer."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            b = int(part)
        except ValueError:
            raise BenchError(f"--batch: {part!r} is not an integer") from None
        if b < 1:
            raise BenchError(f"--batch: {b} must be at least 1")
        out.append(b)
    if not out:
        raise BenchError("--batch: give at least one batch size, e.g. 1,8,64")
    return tuple(out)


def _warm_runtime(path: Path, profile: Any) -> None:
    """Import onnxruntime and build (then drop) one session, so the process-wide runtime
    (environment, thread pools, allocator) is not charged to the first bundle's RSS growth."""
    from edgeml.bundle import read_bundle
    from edgeml.profiles import create_session

    session = create_session(read_bundle(Path(path)).model_bytes, profile)
    del session
    gc.collect()


def run_models_bench(bundles: Sequence[Path], *, profile: str = "x86-gateway",
                     batches: Sequence[int] = DEFAULT_BATCHES, seconds: float = 1.0,
                     progress: Progress | None = None) -> dict:
    """Benchmark every bundle under the emulated profile; the JSON-ready report."""
    from edgeml.host.bench.report import machine_info
    from edgeml.profiles import load_profile

    if seconds <= 0:
        raise BenchError(f"--seconds: {seconds} must be positive")
    for b in bundles:
        if not Path(b).is_file():
            raise BenchError(f"{b}: no such bundle file")
    prof = load_profile(profile)
    if bundles:
        _warm_runtime(bundles[0], prof)
    results = []
    with emulate_profile(prof) as emu:
        if progress:
            progress(emu.note)
        for path in bundles:
            results.append(bench_bundle(Path(path), prof, batches=batches, seconds=seconds,
                                        progress=progress))
    return {
        "kind": "models",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "emulation": asdict(emu),
        "settings": {"profile": profile, "batches": list(batches), "seconds": seconds},
        "results": [_model_dict(r) for r in results],
    }


def _model_dict(r: ModelBench) -> dict:
    d = asdict(r)
    d["input_shape"] = list(r.input_shape)
    d["rss_load_growth_bytes"] = r.rss_load_growth_bytes
    return d
