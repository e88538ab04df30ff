"""Readers for the real sensor recordings that ship with edgeml (demo, tests, benchmarks).

BasicMotions: smart-watch IMU, 6 channels at 10 Hz, 100 samples per series, 4 activities.
Daphnet: Freezing-of-Gait, 9 accelerometer channels at 64 Hz, ``is_anomaly`` ground truth.
Both are public UCR/UEA archive data; see ``edgeml/host/demo_data``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

BASICMOTIONS_CHANNELS: tuple[str, ...] = ("ax", "ay", "az", "gx", "gy", "gz")
BASICMOTIONS_WINDOW = 100
DAPHNET_CHANNELS: tuple[str, ...] = (
    "ankle_horiz_fwd", "ankle_vert", "ankle_horiz_lateral",
    "leg_horiz_fwd", "leg_vert", "leg_horiz_lateral",
    "trunk_horiz_fwd", "trunk_vert", "trunk_horiz_lateral",
)


@dataclass(frozen=True)
class SeriesSet:
    """Equal-length multichannel series: ``X`` is float32 ``[n_series, length, n_channels]``."""

    X: np.ndarray
    y: tuple[str, ...]
    channels: tuple[str, ...]

    def flat(self) -> np.ndarray:
        """Windows as the runtime feeds them: ``[n, length * n_channels]``, sample-major."""
        n, length, c = self.X.shape
        return self.X.reshape(n, length * c)


def demo_data_dir() -> Path:
    return Path(str(resources.files("edgeml.host") / "demo_data"))


def read_ts(path: Path, channels: tuple[str, ...]) -> SeriesSet:
    """Read a sktime/aeon ``.ts`` file with equal-length series and a class label."""
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower() == "@data"
                continue
            *dims, label = line.split(":")
            arr = np.array([[float(v) for v in d.split(",")] for d in dims], dtype=np.float32)
            series.append(arr.T)  # [length, channels]
            labels.append(label)
    X = np.stack(series)
    if X.shape[2] != len(channels):
        raise ValueError(f"{path}: {X.shape[2]} channels, expected {len(channels)}")
    return SeriesSet(X=X, y=tuple(labels), channels=channels)


def load_basicmotions(split: str = "TRAIN", data_dir: Path | None = None) -> SeriesSet:
    """``split`` is ``TRAIN`` or ``TEST``; 40 series of 100 samples x 6 channels each."""
    split = split.upper()
    if split not in ("TRAIN", "TEST"):
        raise ValueError(f"split must be TRAIN or TEST, not {split!r}")
    base = data_dir or demo_data_dir()
    return read_ts(Path(base) / f"BasicMotions_{split}.ts", BASICMOTIONS_CHANNELS)


@dataclass(frozen=True)
class SampleSet:
    """Single samples: ``X`` float32 ``[n, n_channels]``, ``y`` int labels (1 = anomaly)."""

    X: np.ndarray
    y: np.ndarray
    channels: tuple[str, ...]


def load_daphnet(data_dir: Path | None = None) -> SampleSet:
    base = data_dir or demo_data_dir()
    rows: list[list[float]] = []
    labels: list[int] = []
    with open(Path(base) / "S06R02E0.csv", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for rec in reader:
            rows.append([float(rec[c]) for c in DAPHNET_CHANNELS])
            labels.append(int(rec["is_anomaly"]))
    return SampleSet(
        X=np.asarray(rows, dtype=np.float32), y=np.asarray(labels), channels=DAPHNET_CHANNELS
    )


DAPHNET_HZ = 64


def daphnet_walking_start(X: np.ndarray, *, threshold: float = 100.0) -> int:
    """The first sample of the first 2-second block in which the ankle sensor moves (the
    mean standard deviation of its three axes over ``threshold`` milli-g). The Daphnet
    recording opens with about 20 s of standing; drift figures on it compare like with like
    from here on (docs/operations.md)."""
    blk = 2 * DAPHNET_HZ
    for s in range(0, len(X) - blk + 1, blk):
        if float(np.asarray(X[s:s + blk, :3], dtype=np.float64).std(0).mean()) > threshold:
            return s
    raise ValueError("no block in which the ankle sensor moves")
