"""``edgeml bench e2e``: the whole path, side by side with the plain alternatives, in one run.

For each model (light: logistic regression; heavy: IsolationForest, both on Daphnet single
samples) and each version count (1, or champion + challenger + shadow), the same publisher
replays the same real samples through one mosquitto to:

(a) nothing: raw onnxruntime over the same rows at batch 1 and the profile's max batch
    (the scoring limit, measured in this process);
(b) a raw paho subscriber that only counts messages (the transport limit);
(c) the plain script: paho ``on_message`` -> decode -> ``session.run`` per version -> publish;
(d) edgeml: ``python -m edgeml run --config FILE`` with the same versions;
(e) the same daemon with ``output_qos = 0`` (answers at QoS 0, as the plain script publishes
    them), at the largest version count, for parity.

Every message carries an ``id`` and its publish time; latency is publish -> answer received,
measured by a separate collector process. Two phases per target: paced (default 1,000 msg/s,
the latency figures) and as fast as the publisher can go (the throughput figures). Each process
is its own interpreter, so nothing is shared but the CPU — which is the point on a 2-core box.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import BenchError
from edgeml.host.bench.models import time_session

Progress = Callable[[str], None]

#: the plain alternatives and the daemon; "edgeml-qos0": the daemon answering at QoS 0 like
#: the plain script (output_qos = 0), at the largest version count, for parity
VARIANTS = ("onnx", "raw", "plain", "edgeml", "edgeml-qos0")
MODEL_KINDS: dict[str, str] = {
    "light": "StandardScaler + LogisticRegression on Daphnet single samples (9 features)",
    "heavy": "IsolationForest (100 trees) on Daphnet single samples (9 features)",
}
ROLE_ORDER = ("champion", "challenger", "shadow")
PROBE_FIRST_ID = 900_000_000
PIPELINE = "gait"
PREFIX = "bench"
SYNC_IDLE_S = 3.0  # the uplink is done when no sync batch came for this long
SYNC_WAIT_S = 30.0  # at most this long after the phase for the rest of its sync batches


def require_host_extra() -> None:
    """The bench trains and converts its models: scikit-learn and skl2onnx must be present."""
    missing = []
    for mod in ("sklearn", "skl2onnx", "onnx", "converters"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise BenchError(
            f"edgeml bench needs the host extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'edgeml[host]'"
        )


@dataclass(frozen=True, kw_only=True)
class E2ESettings:
    """What one ``bench e2e`` run measures. Validated when built."""

    out_dir: Path
    broker_url: str | None = None
    broker_config: str = "stock"          # the private mosquitto: stock | tuned
    paced_rate: float | None = 1000.0     # None: no paced phase
    max_rate: bool = True                 # the as-fast-as-possible phase
    messages: int = 20000                 # per max phase
    paced_seconds: float = 5.0            # length of each paced phase
    versions: tuple[int, ...] = (1, 3)
    models: tuple[str, ...] = ("light", "heavy")
    variants: tuple[str, ...] = ("onnx", "raw", "plain", "edgeml", "edgeml-qos0")
    profile: str = "x86-gateway"
    format: str = "msgpack"
    qos: int = 0
    phase_timeout_s: float = 20.0         # cap on one max phase (the heavy plain script)
    onnx_seconds: float = 1.0             # per batch size in the scoring-limit measurement
    plain_threads: int = 1
    start_timeout_s: float = 30.0
    #: phases after paced/max: "burst" (QoS 1 lines through mosquitto_pub -l), "samples"
    #: (the flood with samples_per_message samples per message)
    extra_phases: tuple[str, ...] = ("burst", "samples")
    burst_messages: int = 20000
    samples_per_message: int = 10
    #: messages in the samples phase: long enough (about a second) that start-up and the
    #: last batch do not decide the rate
    samples_messages: int = 10000
    sync_off: bool = True                 # the daemon again, outbox and uplink off (max, samples)
    #: "split": the target alone on the last core, broker/load/receivers on the others;
    #: "none": unpinned. Each one is a full pass.
    affinity: tuple[str, ...] = ("split", "none")

    def __post_init__(self) -> None:
        if self.paced_rate is not None and not self.paced_rate > 0:
            raise BenchError(f"--rate: {self.paced_rate} must be positive")
        if self.broker_config not in ("stock", "tuned"):
            raise BenchError(f"--broker-config: {self.broker_config!r} is not stock or tuned")
        if self.paced_rate is None and not self.max_rate:
            raise BenchError("nothing to measure: give --rate R, --max, or neither for both")
        if self.messages < 10:
            raise BenchError(f"--messages: {self.messages} is too few (at least 10)")
        if self.paced_seconds <= 0:
            raise BenchError(f"--paced-seconds: {self.paced_seconds} must be positive")
        for v in self.versions:
            if not 1 <= v <= len(ROLE_ORDER):
                raise BenchError(f"--versions: {v} must be 1..{len(ROLE_ORDER)} "
                                 "(champion, challenger, shadow)")
        for m in self.models:
            if m not in MODEL_KINDS:
                raise BenchError(f"--models: unknown model {m!r} (known: {', '.join(MODEL_KINDS)})")
        for v in self.variants:
            if v not in VARIANTS:
                raise BenchError(f"--variants: unknown variant {v!r} "
                                 f"(known: {', '.join(VARIANTS)})")
        if self.format not in ("msgpack", "json"):
            raise BenchError(f"--format: {self.format!r} must be msgpack or json")
        if self.qos not in (0, 1):
            raise BenchError(f"--qos: {self.qos} must be 0 or 1")
        for ph in self.extra_phases:
            if ph not in ("burst", "samples"):
                raise BenchError(f"--phases: unknown phase {ph!r} (known: paced, max, burst, "
                                 "samples)")
        for a in self.affinity:
            if a not in ("split", "none"):
                raise BenchError(f"--affinity: {a!r} is not split or none")
        if not self.affinity:
            raise BenchError("--affinity: give split, none or both")
        if self.burst_messages < 10:
            raise BenchError(f"--burst-messages: {self.burst_messages} is too few (at least 10)")
        if not 2 <= self.samples_per_message <= 1024:
            raise BenchError(f"--samples: {self.samples_per_message} must be 2..1024")
        if self.samples_messages < 10:
            raise BenchError(f"--samples-messages: {self.samples_messages} is too few "
                             "(at least 10)")

    @property
    def phase_list(self) -> tuple[str, ...]:
        return ((("paced",) if self.paced_rate is not None else ())
                + (("max",) if self.max_rate else ()) + tuple(self.extra_phases))

    @property
    def paced_messages(self) -> int:
        return max(10, round((self.paced_rate or 0) * self.paced_seconds))


# --- the models ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchModel:
    kind: str          # light | heavy
    name: str
    version: str
    role: str
    bundle: Path
    onnx: Path


def _gait_label(X: np.ndarray) -> np.ndarray:
    """Stand-in target for the light model: Daphnet's labels in the demo file are all 0, so
    the label is a rule on the data (ankle acceleration magnitude above its median). Honest
    about what it is: a model with a real decision boundary, not a gait detector."""
    mag = np.sqrt((X[:, :3].astype(np.float64) ** 2).sum(axis=1))
    return (mag > np.median(mag)).astype(np.int64)


def build_models(work: Path, kinds: Sequence[str], n_versions: int,
                 progress: Progress | None = None) -> dict[str, list[BenchModel]]:
    """Train ``n_versions`` versions of each model kind (seeds 0, 1, 2; versions 2 and 3 on
    bootstrap resamples, so they differ a little) and convert them with
    :func:`converters.convert_estimator` (parity check, self-test), the path a user takes.
    Also writes the bare ``.onnx`` files the plain script loads. Host-side only: this is where
    scikit-learn is imported, never on the device path."""
    from sklearn.ensemble import IsolationForest
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from converters import convert_estimator
    from edgeml.bundle import read_bundle
    from edgeml.host.datasets import load_daphnet

    data = load_daphnet()
    X = data.X
    y = _gait_label(X)
    out: dict[str, list[BenchModel]] = {}
    work.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        out[kind] = []
        for i in range(n_versions):
            rng = np.random.default_rng(i)
            idx = rng.choice(len(X), size=len(X), replace=True) if i else np.arange(len(X))
            if kind == "light":
                est = make_pipeline(StandardScaler(),
                                    LogisticRegression(C=1.0 / (1 + i), max_iter=500))
                est.fit(X[idx], y[idx])
                labels = y[::10]
            else:
                est = IsolationForest(n_estimators=100, random_state=i).fit(X[idx])
                labels = None
            name, version = f"gait-{kind}", str(i + 1)
            report = convert_estimator(
                est, X[::10], name=name, version=version, features=data.channels,
                out=work / f"{name}-{version}.edgeml", training_data=X[idx], labels=labels,
                description=f"edgeml bench {kind} model ({ROLE_ORDER[i]}): {MODEL_KINDS[kind]}",
            )
            bundle = Path(report.path)
            onnx_path = work / f"{name}-{version}.onnx"
            onnx_path.write_bytes(read_bundle(bundle).model_bytes)
            out[kind].append(BenchModel(kind=kind, name=name, version=version,
                                        role=ROLE_ORDER[i], bundle=bundle, onnx=onnx_path))
            if progress:
                progress(f"built {name} {version} ({ROLE_ORDER[i]}, "
                         f"{onnx_path.stat().st_size:,} bytes of ONNX)")
    return out


# --- child processes ----------------------------------------------------------------------------
class Child:
    """A process of the benchmark: JSON events on stdout (``baselines`` roles), log lines on
    stderr (the daemon). ``wait_for`` blocks on a condition, never on a sleep."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path,
                 ready_line: str | None = None) -> None:
        self.name = name
        self.events: queue.Queue[dict] = queue.Queue()
        self.ready_line = ready_line
        self.ready_ns: int | None = None
        self.stderr_tail: list[str] = []
        self.started_ns = time.time_ns()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, bufsize=1)
        self._ready_event = threading.Event()
        self._held: list[dict] = []
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                self._log.write(f"stdout: {line}\n")
                continue
            if isinstance(ev, dict) and "event" in ev:
                ev["_ns"] = time.time_ns()
                self.events.put(ev)
        self.events.put({"event": "exit", "_ns": time.time_ns()})

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.write(line)
            self.stderr_tail = [*self.stderr_tail[-40:], line.rstrip()]
            if (self.ready_line and self.ready_ns is None
                    and self.ready_line in line.lower()):
                self.ready_ns = time.time_ns()
                self._ready_event.set()
        self._log.flush()

    def next_event(self, timeout: float) -> dict | None:
        """The next event (held-back ones first), or None after ``timeout``."""
        if self._held:
            return self._held.pop(0)
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain_progress(self) -> list[dict]:
        """Progress events that arrived so far, without blocking; other events are kept."""
        out = []
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return out
            (out if ev["event"] == "progress" else self._held).append(ev)

    def wait_event(self, name: str, timeout: float, *,
                   on_event: Callable[[dict], None] | None = None,
                   also_alive: Child | None = None) -> dict:
        """Block until event ``name``; fail early when this child (or ``also_alive``) exits."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no '{name}' within {timeout:g} s"
                                 + self._tail())
            if also_alive is not None and also_alive.proc.poll() is not None:
                raise BenchError(f"{also_alive.name} exited (code "
                                 f"{also_alive.proc.returncode})" + also_alive._tail())
            ev = self.next_event(min(left, 0.25))
            if ev is None:
                continue
            if ev["event"] == name:
                return ev
            if ev["event"] == "exit":
                self.proc.wait(5)
                raise BenchError(f"{self.name} exited (code {self.proc.returncode}) before "
                                 f"'{name}'" + self._tail())
            if on_event:
                on_event(ev)

    def wait_ready_line(self, timeout: float) -> bool:
        return self._ready_event.wait(timeout)

    def _tail(self) -> str:
        tail = [t for t in self.stderr_tail if t][-5:]
        return (": " + " | ".join(tail)) if tail else ""

    def cpu_seconds(self) -> float:
        """user + system CPU of the process (all its threads) so far."""
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) in bytes."""
        out = {}
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        out[line.split(":")[0]] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return {"rss_bytes": out.get("VmRSS", 0), "rss_peak_bytes": out.get("VmHWM", 0)}

    def loaded_libraries(self, *needles: str) -> list[str]:
        """Which of ``needles`` appear among the shared objects mapped into the process."""
        try:
            maps = Path(f"/proc/{self.pid}/maps").read_text(errors="replace")
        except OSError:
            return []
        return [n for n in needles if f"/{n}/" in maps]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self._threads:
            t.join(2)
        self._log.close()
        return self.proc.returncode


def _role(role: str, spec: dict, run_dir: Path, name: str) -> Child:
    spec_path = run_dir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    return Child(name, [sys.executable, "-m", "edgeml.host.bench.baselines", role, f"@{spec_path}"],
                 log_path=run_dir / f"{name}.log")


# --- statistics ---------------------------------------------------------------------------------
def latency_stats(lat_ms: np.ndarray) -> dict[str, float | None]:
    if lat_ms.size == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p90_ms": float(np.percentile(lat_ms, 90)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "max_ms": float(lat_ms.max()),
        "mean_ms": float(lat_ms.mean()),
    }


QUANTILES: tuple[float, ...] = (*np.linspace(0, 99, 100).tolist(), 99.5, 99.9, 100.0)


def quantiles(lat_ms: np.ndarray) -> dict[str, list[float]]:
    """The latency distribution as exact quantiles (for the CDF chart; small in the JSON)."""
    if lat_ms.size == 0:
        return {"q": [], "ms": []}
    vals = np.percentile(lat_ms, QUANTILES)
    return {"q": [round(q, 2) for q in QUANTILES], "ms": [round(float(v), 4) for v in vals]}


# --- the harness --------------------------------------------------------------------------------
@dataclass
class Harness:
    settings: E2ESettings
    progress: Progress = field(default=lambda s: None)
    host: str = "127.0.0.1"
    port: int = 0
    run_dir: Path = field(default=Path("."))
    target_cpus: set[int] | None = None  # None: unpinned
    load_cpus: set[int] | None = None
    _seq: int = 0

    def say(self, msg: str) -> None:
        self.progress(msg)

    def _name(self, base: str) -> str:
        self._seq += 1
        return f"{self._seq:02d}-{base}"

    def _base(self) -> dict:
        return {"host": self.host, "port": self.port}

    # -- one measured phase ---------------------------------------------------------------------
    def phase(self, *, label: str, in_topic: str, answer_topic: str | None, target: Child | None,
              mode: str, first_id: int, sync_topic: str | None = None) -> dict:
        """Publish one stream and time its answers. ``answer_topic`` None: the raw subscriber
        on ``in_topic`` is itself the receiver. Modes: ``paced``, ``max`` (QoS 0 flood),
        ``samples`` (the flood with ``samples_per_message`` samples per message), ``burst``
        (QoS 1 lines through ``mosquitto_pub -l``; latency is time since the burst began)."""
        s = self.settings
        per_msg = s.samples_per_message if mode == "samples" else 1
        qos = 1 if mode == "burst" else s.qos
        if mode == "paced":
            n, rate, budget = s.paced_messages, float(s.paced_rate or 0), s.paced_seconds + 15
        elif mode == "burst":
            n, rate, budget = s.burst_messages, 0.0, s.phase_timeout_s
        elif mode == "samples":
            n, rate, budget = s.samples_messages, 0.0, s.phase_timeout_s
        else:
            n, rate, budget = s.messages, 0.0, s.phase_timeout_s
        name = self._name(f"{label}-{mode}")
        out = str(self.run_dir / name)
        recv_spec = dict(self._base(), topic=answer_topic or in_topic,
                         expect=n,
                         timeout_s=budget + 5, idle_s=5.0, out=out + ".recv", qos=qos,
                         client_id=f"bench-recv-{name}")
        receiver = _role("collect" if answer_topic else "count", recv_spec, self.run_dir,
                         name + ".recv")
        self._pin(receiver.pid, load=True)
        ready = receiver.wait_event("ready", 30)
        cpu_target = target or receiver
        cpu0, cpu_ready_recv = cpu_target.cpu_seconds(), ready.get("cpu_s", 0.0)
        synced = None  # the daemon's uplink, watched on its sync topic (the max phase)
        if sync_topic and mode == "max":
            synced = _role("count", dict(self._base(), topic=sync_topic, expect=0,
                                         timeout_s=budget + 5 + SYNC_WAIT_S, qos=1,
                                         idle_s=SYNC_IDLE_S, sync=True, out=out + ".sync",
                                         client_id=f"bench-sync-{name}"),
                           self.run_dir, name + ".sync")
            self._pin(synced.pid, load=True)
            synced.wait_event("ready", 30)
        pub = _role("burst" if mode == "burst" else "publish",
                    dict(self._base(), topic=in_topic, messages=n, rate=rate,
                         first_id=first_id, format=s.format, qos=qos, samples=per_msg,
                         out=out + ".pub", client_id=f"bench-pub-{name}"),
                    self.run_dir, name + ".pub")
        self._pin(pub.pid, load=True)
        pub.wait_event("ready", 30)
        t_start = time.monotonic()
        last_shown = [t_start]

        def show(ev: dict) -> None:
            now = time.monotonic()
            if ev["event"] == "progress" and now - last_shown[0] >= 1.0:
                last_shown[0] = now
                self.say(f"  {label} {mode}: {ev.get('received')}/{n} answers "
                         f"({now - t_start:.1f} s)")

        def show_receiver(_: dict) -> None:
            for ev in receiver.drain_progress():
                show(ev)

        pub_done = pub.wait_event("done", budget + 60, on_event=show_receiver,
                                  also_alive=target)
        pub.stop()
        recv_done = receiver.wait_event("done", budget + 30, on_event=show, also_alive=target)
        cpu1 = cpu_target.cpu_seconds() if target else recv_done.get("cpu_s", float("nan"))
        mem = target.memory() if target else {}
        receiver.stop()
        pub_ns = np.load(out + ".pub.pub_ns.npy")
        recv_ns = np.load(out + ".recv.recv_ns.npy")
        ids = np.load(out + ".recv.ids.npy")
        ok = (ids >= first_id) & (ids < first_id + n)
        recv_ns, ids = recv_ns[ok], ids[ok]
        ids_unique, first_idx = np.unique(ids, return_index=True)
        lat = (recv_ns[first_idx] - pub_ns[ids_unique - first_id]) / 1e6
        answered = int(ids_unique.size)
        span = (recv_ns.max() - pub_ns[0]) / 1e9 if answered else 0.0
        cpu = (cpu1 - cpu0) if target else (cpu1 - cpu_ready_recv)
        result = {
            "mode": mode, "target_rate": rate or None, "sent": n, "answered": answered,
            "lost": n - answered, "duplicates": int(ids.size - answered),
            "complete": answered == n,
            "saturated": bool(mode == "paced" and span > 0 and answered / span < 0.95 * rate),
            "publish_rate": float(pub_done.get("rate", 0.0)),
            "msgs_per_s": answered / span if span > 0 else 0.0,
            "rows_per_s": answered * per_msg / span if span > 0 else 0.0,
            "samples_per_message": per_msg, "qos": qos, "pinned": bool(self.target_cpus),
            **latency_stats(lat),
            "cpu_s": cpu, "cpu_ms_per_msg": cpu * 1000 / answered if answered else None,
            **mem, "quantiles": quantiles(lat),
        }
        if mode == "burst":
            result["drain_s"] = span
        if synced is not None:
            result.update(self._sync_lag(synced, out + ".sync", first_id, n, ids_unique,
                                         int(recv_ns.max()) if answered else None,
                                         cpu_target, cpu0, answered))
        lost = f", {n - answered} unanswered" if answered < n else ""
        self.say(f"  {label} {mode}: {result['msgs_per_s']:,.0f} msg/s, p50 "
                 f"{_fmt(result['p50_ms'])} ms, p99 {_fmt(result['p99_ms'])} ms{lost}")
        return result

    def _sync_lag(self, watcher: Child, out: str, first_id: int, n: int, answered_ids: np.ndarray,
                  end_ns: int | None, target: Child | None, cpu0: float, answered: int) -> dict:
        """How long after the phase's last answer its output records reached the upstream
        broker (the uplink's sync batches), how many of the answered messages did, and the
        daemon's CPU per message counted until then (sync included)."""
        watcher.wait_event("done", self.settings.phase_timeout_s + SYNC_WAIT_S + 30,
                           also_alive=target)
        watcher.stop()
        cpu = target.cpu_seconds() - cpu0 if target else float("nan")
        t_ns = np.load(out + ".recv_ns.npy")
        ids = np.load(out + ".ids.npy")
        ok = (ids >= first_id) & (ids < first_id + n)
        t_ns, ids = t_ns[ok], ids[ok]
        missing = int(np.setdiff1d(answered_ids, ids).size)
        synced = int(answered_ids.size) - missing  # of the answered messages
        lag = (int(t_ns.max()) - end_ns) / 1e9 if t_ns.size and end_ns is not None else None
        self.say(f"  synced upstream: {synced:,} of {answered:,} answered, last "
                 f"{_fmt(lag, 2)} s after the last answer")
        return {"synced": synced, "unsynced": missing,
                "sync_lag_s": max(lag, 0.0) if lag is not None else None,
                "cpu_ms_per_msg_with_sync": cpu * 1000 / answered if answered else None}

    def _phases(self, label: str, in_topic: str, answer_topic: str | None,
                target: Child | None, *, only: Sequence[str] | None = None,
                sync_topic: str | None = None) -> dict:
        s = self.settings
        phases = {}
        kw = dict(label=label, in_topic=in_topic, answer_topic=answer_topic, target=target,
                  sync_topic=sync_topic)
        wanted = [m for m in s.phase_list if only is None or m in only]
        first_ids = {"paced": 0, "max": 1_000_000, "samples": 2_000_000, "burst": 3_000_000}
        for mode in wanted:
            phases[mode] = self.phase(**kw, mode=mode, first_id=first_ids[mode])
        return phases

    def _pin(self, pid: int, *, load: bool) -> None:
        """With ``affinity = split``: the target on its own core, everything else on the
        others (a no-op unpinned)."""
        cpus = self.load_cpus if load else self.target_cpus
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, cpus)

    # -- start-up: time to the first answer ------------------------------------------------------
    def start_measured(
        self, label: str, in_topic: str, answer_topic: str, start: Callable[[], Child],
        ready: Callable[[Child], None],
    ) -> tuple[Child, dict]:
        """Start a target while a probe stream runs; time from spawn to its first answer."""
        name = self._name(f"{label}-start")
        out = str(self.run_dir / name)
        s = self.settings
        recv = _role("collect", dict(self._base(), topic=answer_topic, expect=1,
                                     timeout_s=s.start_timeout_s + 5, idle_s=0, out=out + ".recv",
                                     client_id=f"bench-recv-{name}"), self.run_dir, name + ".recv")
        recv.wait_event("ready", 30)
        probe = _role("publish", dict(self._base(), topic=in_topic, rate=500.0,
                                      messages=int(500 * (s.start_timeout_s + 5)),
                                      first_id=PROBE_FIRST_ID, format=s.format, qos=s.qos,
                                      out=out + ".pub", client_id=f"bench-probe-{name}"),
                      self.run_dir, name + ".pub")
        probe.wait_event("ready", 30)
        t0 = time.time_ns()
        target = start()
        try:
            recv.wait_event("done", s.start_timeout_s, also_alive=target)
        except BenchError:
            probe.stop()
            recv.stop()
            target.stop()
            raise
        probe.stop()
        recv.stop()
        ready(target)
        recv_ns = np.load(out + ".recv.recv_ns.npy")
        first = (int(recv_ns[0]) - t0) / 1e9 if recv_ns.size else None
        info = {"first_answer_s": first,
                "ready_log_s": (target.ready_ns - t0) / 1e9 if target.ready_ns else None}
        info.update({f"idle_{k}": v for k, v in target.memory().items()})
        self.say(f"  {label}: first answer {_fmt(first, 3)} s after spawn")
        # let the probe backlog drain so it is not counted in the next phase's CPU
        self._quiesce(answer_topic)
        return target, info

    def _quiesce(self, answer_topic: str, quiet_s: float = 0.3, timeout: float = 30.0) -> None:
        """Wait until no answer has arrived for ``quiet_s`` (the target is idle)."""
        name = self._name("quiesce")
        recv = _role("collect", dict(self._base(), topic=answer_topic, expect=0,
                                     timeout_s=timeout, idle_s=quiet_s, idle_from_start=True,
                                     out=str(self.run_dir / name), client_id=f"bench-q-{name}"),
                     self.run_dir, name)
        recv.wait_event("ready", 30)
        recv.wait_event("done", timeout + 5)
        recv.stop()

    # -- the variants ----------------------------------------------------------------------------
    def run_raw(self) -> dict:
        self.say("raw paho subscriber (transport limit)")
        phases = self._phases("raw", f"{PREFIX}/raw/in", None, None)
        return {"variant": "raw", "model": None, "versions": None, "phases": phases}

    def run_plain(self, kind: str, models: list[BenchModel]) -> dict:
        tag = f"plain-{kind}-{len(models)}"
        self.say(f"plain script, {kind} model, {len(models)} version(s)")
        in_topic, out_topic = f"{PREFIX}/{tag}/in", f"{PREFIX}/{tag}/out"
        from edgeml.host.datasets import DAPHNET_CHANNELS

        # subscribed at QoS 1 and acknowledging after scoring (the QoS 1 burst); the QoS 0
        # streams of the other phases arrive at QoS 0 all the same
        spec = dict(self._base(), topic=in_topic, out_topic=out_topic, qos=1,
                    format=self.settings.format, features=list(DAPHNET_CHANNELS),
                    threads=self.settings.plain_threads, client_id=f"bench-{tag}",
                    models=[{"name": m.name, "version": m.version, "path": str(m.onnx)}
                            for m in models])
        spec_path = self.run_dir / f"{tag}.spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")

        def start() -> Child:
            c = Child(tag, [sys.executable, "-m", "edgeml.host.bench.baselines", "plain",
                            f"@{spec_path}"], log_path=self.run_dir / f"{tag}.log")
            self._pin(c.pid, load=False)
            return c

        target, start_info = self.start_measured(tag, in_topic, out_topic, start, lambda c: None)
        try:
            phases = self._phases(tag, in_topic, out_topic, target)
            mem = target.memory()
        finally:
            target.stop()
        return {"variant": "plain", "model": kind, "versions": len(models), "phases": phases,
                "start": start_info, **mem}

    def run_edgeml(self, kind: str, models: list[BenchModel], *, sync: bool = True,
                   only: Sequence[str] | None = None, output_qos: int = 1) -> dict:
        """The daemon with the config defaults; ``sync=False``: outbox and uplink off (the
        sync-off comparison runs only ``only``'s phases); ``output_qos=0``: answers at QoS 0,
        as the plain script publishes them."""
        s = self.settings
        suffix = ("" if sync else "-nosync") + ("" if output_qos else "-qos0")
        tag = f"edgeml-{kind}-{len(models)}{suffix}"
        device = f"bench-{kind}-{len(models)}{suffix}"
        self.say(f"edgeml daemon, {kind} model, {len(models)} version(s)")
        in_topic = f"{PREFIX}/{tag}/in"
        out_topic = f"{PREFIX}/{device}/out/{PIPELINE}"
        data_dir = self.run_dir / f"{tag}-data"
        # a fresh store each run: models are retrained, and an old store would refuse the
        # same name+version with a different sha256 (the daemon would answer with errors)
        shutil.rmtree(data_dir, ignore_errors=True)
        config = self.run_dir / f"{tag}.toml"
        config.write_text(edgeml_config(device=device, profile=s.profile, data_dir=data_dir,
                                        broker_url=f"mqtt://{self.host}:{self.port}",
                                        in_topic=in_topic, models=models, fmt="auto",
                                        sync=sync, output_qos=output_qos),
                          encoding="utf-8")
        status = StatusWatch(self.host, self.port, f"{PREFIX}/{device}/status")

        def start() -> Child:
            c = Child(tag, [sys.executable, "-m", "edgeml", "-v", "run", "--config",
                            str(config)], log_path=self.run_dir / f"{tag}.log",
                      ready_line="ready")
            self._pin(c.pid, load=False)
            return c

        def ready(c: Child) -> None:
            if not status.online.wait(s.start_timeout_s):
                raise BenchError(f"{tag}: status never said online" + c._tail())
            errors = (status.last or {}).get("load_errors") if isinstance(status.last, dict) \
                else None
            if errors:  # a daemon without its models answers errors fast: not a result
                raise BenchError(f"{tag}: model versions failed to load: {errors}")

        try:
            target, start_info = self.start_measured(tag, in_topic, out_topic, start, ready)
        except BaseException:
            status.close()
            raise
        t_online = status.online_ns
        start_info["status_online_s"] = ((t_online - target.started_ns) / 1e9
                                         if t_online else None)
        try:
            phases = self._phases(tag, in_topic, out_topic, target, only=only,
                                  sync_topic=f"{PREFIX}/{device}/sync/outputs" if sync
                                  else None)
            mem = target.memory()
            device_libs = target.loaded_libraries("sklearn", "scipy", "skl2onnx")
        finally:
            code = target.stop()
            status.close()
        from edgeml.host.bench.baselines import jsonable

        variant = "edgeml" if sync else "edgeml-nosync"
        return {"variant": variant if output_qos else "edgeml-qos0", "model": kind,
                "versions": len(models), "phases": phases,
                "start": start_info, **mem, "host_libraries_loaded": device_libs,
                "exit_code": code, "config": config.read_text(encoding="utf-8"),
                "last_status": jsonable(status.last)}

    def bare_rss(self, kind: str, models: list[BenchModel]) -> dict:
        name = self._name(f"bare-{kind}-{len(models)}")
        from edgeml.profiles import load_profile

        prof = load_profile(self.settings.profile)
        child = _role("bare", {"models": [{"path": str(m.onnx)} for m in models],
                               "profile": self.settings.profile,
                               "max_batch": prof.batching.max_batch}, self.run_dir, name)
        done = child.wait_event("done", 60)
        child.stop()
        return {"rss_bytes": done["rss_kb"] * 1024,
                "python_onnxruntime_bytes": done["python_onnxruntime_kb"] * 1024}


def edgeml_config(*, device: str, profile: str, data_dir: Path, broker_url: str, in_topic: str,
                  models: Sequence[BenchModel], fmt: str, sync: bool = True,
                  output_qos: int = 1) -> str:
    """The daemon config the bench runs: one pipeline, the given versions, defaults elsewhere."""
    from edgeml.host.datasets import DAPHNET_CHANNELS

    feats = ", ".join(f'"{c}"' for c in DAPHNET_CHANNELS)
    lines = [
        f'device_id = "{device}"',
        f'profile = "{profile}"',
        f'data_dir = "{data_dir}"',
        f'topic_prefix = "{PREFIX}"',
        "",
        "[broker]",
        f'url = "{broker_url}"',
        "",
        *([] if sync else ["[sync]", "enabled = false", ""]),
        "[[pipelines]]",
        f'name = "{PIPELINE}"',
        f'topics = ["{in_topic}"]',
        f'format = "{fmt}"',
        f"features = [{feats}]",
        'policy = "champion"',
        "deadline_ms = 50",
        *([] if output_qos == 1 else [f"output_qos = {output_qos}"]),
    ]
    for m in models:
        lines += ["", "[[pipelines.models]]", f'name = "{m.name}"', f'version = "{m.version}"',
                  f'role = "{m.role}"', f'bundle = "{m.bundle}"']
    return "\n".join(lines) + "\n"


class StatusWatch:
    """Watches the daemon's retained status topic for ``state == "online"`` (harness-side paho)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        import paho.mqtt.client as paho

        self.online = threading.Event()
        self.online_ns: int | None = None
        self.last: Any = None
        self._c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="",
                              clean_session=True)
        self._c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, 1)
        self._c.on_message = self._on_message
        self._c.connect(host, port)
        self._c.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        from edgeml.host.bench.baselines import _decode

        try:
            st = _decode(msg.payload)
        except Exception:
            return
        self.last = st
        if isinstance(st, dict) and st.get("state") == "online" and not self.online.is_set():
            self.online_ns = time.time_ns()
            self.online.set()

    def close(self) -> None:
        self._c.loop_stop()
        self._c.disconnect()


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# --- scoring limit ------------------------------------------------------------------------------
def scoring_limit(models: dict[str, list[BenchModel]], profile_name: str, versions: Sequence[int],
                  *, seconds: float, progress: Progress) -> list[dict]:
    """(a) raw onnxruntime over the same Daphnet rows, sessions built from the profile,
    at batch 1 and the profile's max batch; msgs/s limit for k versions scored one after the
    other in one thread (what a single core can do)."""
    from edgeml.bundle import read_bundle
    from edgeml.host.bench.models import rows_for_input
    from edgeml.profiles import create_session, load_profile

    prof = load_profile(profile_name)
    big = prof.batching.max_batch
    rows = []
    for kind, ms in models.items():
        per_version: dict[int, list] = {}
        for m in ms[: max(versions)]:
            b = read_bundle(m.bundle)
            X = rows_for_input(b.manifest.input).X
            sess = create_session(b.model_bytes, prof)
            for batch in sorted({1, big}):
                progress(f"onnxruntime {m.name} {m.version} batch {batch}")
                t = time_session(sess, X, batch, seconds=seconds)
                per_version.setdefault(batch, []).append(t)
        for k in versions:
            for batch, ts in per_version.items():
                use = ts[:k]
                us = sum(t.us_per_row for t in use)
                rows.append({
                    "model": kind, "versions": k, "batch": batch,
                    "us_per_row": us, "rows_per_s": 1e6 / us if us else 0.0,
                    "msgs_per_s_limit": 1e6 / us if us else 0.0,
                    "p50_ms_per_call": sum(t.p50_ms for t in use),
                    "p99_ms_per_call": sum(t.p99_ms for t in use),
                    "per_version": [asdict(t) for t in use],
                })
    return rows


# --- entry point --------------------------------------------------------------------------------
def _run_pass(h: Harness, s: E2ESettings, models: dict[str, list[BenchModel]], report: dict,
              affinity: str, say: Progress) -> None:
    """Every selected variant once, with the harness's CPU affinity."""
    def add(run: dict) -> None:
        run["affinity"] = affinity
        report["runs"].append(run)

    if "raw" in s.variants:
        add(h.run_raw())
    for kind in s.models:
        for k in s.versions:
            ms = models[kind][:k]
            for variant in ("plain", "edgeml", "edgeml-nosync", "edgeml-qos0"):
                if variant == "edgeml-nosync":
                    if not (s.sync_off and s.max_rate and "edgeml" in s.variants):
                        continue
                elif variant not in s.variants:
                    continue
                if variant == "edgeml-qos0" and k != max(s.versions):
                    continue  # parity at the largest version count only (the targets' own)
                try:
                    if variant == "plain":
                        run = h.run_plain(kind, ms)
                    elif variant == "edgeml":
                        run = h.run_edgeml(kind, ms)
                    elif variant == "edgeml-qos0":
                        run = h.run_edgeml(kind, ms, output_qos=0)
                    else:
                        # the max phase, and the ten-sample flood where syncing weighs most
                        run = h.run_edgeml(kind, ms, sync=False, only=("max", "samples"))
                except BenchError as exc:
                    say(f"  FAILED: {exc}")
                    report["errors"].append({"variant": variant, "model": kind,
                                             "versions": k, "affinity": affinity,
                                             "error": str(exc)})
                    continue
                add(run)
            if "edgeml" in s.variants and affinity == s.affinity[-1]:
                report["bare"].append({"model": kind, "versions": k, **h.bare_rss(kind, ms)})


def run_e2e(settings: E2ESettings, *, progress: Progress | None = None) -> dict:
    """Run every selected variant and phase; the JSON-ready report (see report.py)."""
    from edgeml.host.bench.report import add_derived, machine_info
    from edgeml.host.broker import MosquittoBroker
    from edgeml.profiles import load_profile
    from edgeml.transport.settings import parse_broker_url

    say = progress or (lambda s: None)
    require_host_extra()
    load_profile(settings.profile)  # fail early on a bad profile name
    s = settings
    run_dir = s.out_dir / "work"
    run_dir.mkdir(parents=True, exist_ok=True)
    t_run = time.monotonic()
    say(f"building models into {run_dir}")
    models = build_models(run_dir / "bundles", s.models, max(s.versions), progress=say)
    report: dict[str, Any] = {
        "kind": "e2e",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v)
                        for k, v in asdict(s).items()}, "paced_messages": s.paced_messages},
        "models": {k: MODEL_KINDS[k] for k in s.models},
        "scoring_limit": [], "runs": [], "bare": [], "errors": [],
    }
    if "onnx" in s.variants:
        say("scoring limit: raw onnxruntime over the same rows")
        report["scoring_limit"] = scoring_limit(models, s.profile, s.versions,
                                                seconds=s.onnx_seconds, progress=say)
    broker = None
    if s.broker_url:
        _, host, port = parse_broker_url(s.broker_url)
    else:
        broker = MosquittoBroker(run_dir / "broker",
                                 tuned=s.broker_config == "tuned").start()
        host, port = broker.host, broker.port
        say(f"started a private mosquitto ({s.broker_config} configuration) on {broker.url}")
    cpus = sorted(os.sched_getaffinity(0))
    home = set(os.sched_getaffinity(0))
    try:
        for affinity in s.affinity:
            target_cpus = load_cpus = None
            if affinity == "split":
                if len(cpus) < 2:
                    say("affinity split needs at least 2 CPUs; skipped")
                    continue
                target_cpus, load_cpus = {cpus[-1]}, set(cpus[:-1])
            say(f"pass: {'target pinned to CPU ' + str(cpus[-1]) if target_cpus else 'unpinned'}")
            if broker is not None and broker.process is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(broker.process.pid, load_cpus or home)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, load_cpus or home)
            h = Harness(settings=s, progress=say, host=host, port=port, run_dir=run_dir,
                        target_cpus=target_cpus, load_cpus=load_cpus)
            h._seq = len(report["runs"]) * 20  # distinct scratch names per pass
            _run_pass(h, s, models, report, affinity, say)
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, home)
        if broker is not None:
            broker.stop()
    report["duration_s"] = time.monotonic() - t_run
    add_derived(report)
    return report
