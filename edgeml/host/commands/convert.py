"""``edgeml convert MODEL.joblib --sample FILE --name N --version V -o OUT.edgeml``."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from edgeml.errors import ConversionError

HELP = "convert a fitted scikit-learn model (joblib) into a checked .edgeml bundle"
DESCRIPTION = """\
Convert a fitted scikit-learn estimator or Pipeline, saved with joblib.dump, into an
.edgeml bundle. The ONNX model is run with onnxruntime on the --sample rows and compared
with the estimator itself: every label must be identical and every score within
--tolerance, otherwise nothing is written and the command exits 1.

--sample holds rows exactly as the device will feed them:
  .npy   float array [n, n_features], or windows [n, window*n_features] (sample-major)
         or [n, window, n_features]
  .csv   one row per line; a header row (non-numeric first line) names the features
         when --features is not given (single-sample models only)
  .npz   array X as above, optional y (true labels) and features (names)

Examples:
  edgeml convert activity.joblib --sample test.npz --name activity --version 3 \\
      --features ax,ay,az,gx,gy,gz --window 100 --sign-key keys/release.key \\
      -o activity-3.edgeml
  edgeml convert gait.joblib --sample gait.csv --name gait --version 1 -o gait-1.edgeml

Loading a joblib file runs code from it: convert only models you trust.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.joblib",
                        help="fitted estimator or Pipeline saved with joblib.dump")
    parser.add_argument("--sample", required=True, type=Path, metavar="FILE",
                        help="rows for the parity check and self-test (.npy, .csv or .npz)")
    parser.add_argument("--name", required=True, help="model name (A-Z a-z 0-9 . _ -)")
    parser.add_argument("--version", required=True, help="model version (A-Z a-z 0-9 . _ -)")
    parser.add_argument("--features", metavar="A,B,C",
                        help="per-sample feature (channel) names, comma-separated; default: "
                        "the CSV header or the npz 'features' array")
    parser.add_argument("--window", type=int, metavar="N",
                        help="samples per window when the model takes windows (default: "
                        "the model scores single samples)")
    parser.add_argument("--input-shape", choices=("flat", "3d"), default="flat",
                        help="ONNX input layout for window models: flat [n, N*features] "
                        "(default) or 3d [n, N, features]")
    parser.add_argument("--converter", choices=("edgeml", "skl2onnx"), default="edgeml",
                        help="edgeml (default): IsolationForest is lowered to one tree "
                        "ensemble (about 50x faster at batch 1, same labels); skl2onnx: "
                        "skl2onnx's own graph for every model")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 dynamic quantization when the graph has MatMul weights "
                        "(MLP, PCA); reported, not parity-checked")
    parser.add_argument("--sign-key", type=Path, metavar="K",
                        help="Ed25519 private key (from edgeml keygen) to sign the bundle")
    parser.add_argument("--tolerance", type=float, default=1e-4, metavar="T",
                        help="max |score difference| ONNX vs scikit-learn (default 1e-4)")
    parser.add_argument("--labels", type=Path, metavar="FILE",
                        help="true labels of the sample rows for accuracy figures (.npy, "
                        "or text with one label per line); default: y from a .npz sample")
    parser.add_argument("--training-data", type=Path, metavar="FILE",
                        help="training rows (.npy/.npz/.csv) to fingerprint in the manifest "
                        "and to profile as the drift reference")
    parser.add_argument("--older-devices", action="store_true",
                        help="write a manifest that devices from before the manifest's "
                        "'release' and 'reference' keys also load: both go inside "
                        "'provenance' (signed like the rest), which those devices do not "
                        "interpret; current devices read them from there")
    parser.add_argument("--self-test-rows", type=int, default=8, metavar="N",
                        help="sample rows recorded as the device self-test (default 8)")
    parser.add_argument("--description", default="", help="free text for the manifest")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.edgeml",
                        help="bundle file to write")


def _parse_number_row(row: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in row]
    except ValueError:
        return None


def read_csv(path: Path) -> tuple[Any, list[str] | None]:
    """Rows as float32 and the header names (None when the first line is numeric)."""
    import numpy as np

    with open(path, encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise ConversionError(f"{path}: empty CSV file")
    header = None
    if _parse_number_row(rows[0]) is None:
        header = [c.strip() for c in rows[0]]
        rows = rows[1:]
    data = []
    for i, row in enumerate(rows, start=2 if header else 1):
        values = _parse_number_row(row)
        if values is None:
            raise ConversionError(f"{path}: line {i} is not all numbers")
        data.append(values)
    widths = {len(r) for r in data}
    if len(widths) > 1 or (header and widths and widths != {len(header)}):
        raise ConversionError(f"{path}: rows have different numbers of columns")
    return np.asarray(data, dtype=np.float32), header


def read_rows(path: Path) -> tuple[Any, Any, list[str] | None]:
    """``(X, y or None, feature names or None)`` from .npy, .csv or .npz."""
    import numpy as np

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None, None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "X" not in z.files:
                    raise ConversionError(
                        f"{path}: no array 'X' (found: {', '.join(z.files) or 'none'})"
                    )
                y = z["y"] if "y" in z.files else None
                names = [str(f) for f in z["features"]] if "features" in z.files else None
                return z["X"], y, names
        if suffix == ".csv":
            X, header = read_csv(path)
            return X, None, header
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: cannot read: {exc}") from exc
    raise ConversionError(f"{path}: unknown sample format {suffix!r} (use .npy, .csv or .npz)")


def read_labels(path: Path) -> Any:
    """Labels from .npy (no pickles) or a text file with one label per line (an optional
    first line ``label`` or ``y`` is a header); integers stay integers."""
    import numpy as np

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False).reshape(-1)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"{path}: cannot read labels: {exc}") from exc
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and lines[0].lower() in ("label", "y"):
        lines = lines[1:]
    out: list[Any] = []
    for ln in lines:
        try:
            out.append(int(ln))
        except ValueError:
            out.append(ln)
    return np.asarray(out)


def _features(args: argparse.Namespace, from_file: list[str] | None, model: Any) -> list[str]:
    if args.features:
        return [f.strip() for f in args.features.split(",") if f.strip()]
    if from_file and args.window is None:
        return from_file
    names = getattr(model, "feature_names_in_", None)
    if names is not None and args.window is None:
        return [str(n) for n in names]
    raise ConversionError(
        "--features is required: "
        + ("a window model needs the per-sample channel names" if args.window
           else f"{args.sample} has no header row naming the features")
    )


def run(args: argparse.Namespace) -> int:
    import joblib

    from converters import convert_estimator
    from converters.parity import ParityMismatch

    if not args.model.is_file():
        raise ConversionError(f"{args.model}: no such file")
    try:
        model = joblib.load(args.model)
    except Exception as exc:  # unpickling can raise anything
        raise ConversionError(f"{args.model}: cannot load with joblib: {exc}") from exc
    X, y, names = read_rows(args.sample)
    features = _features(args, names, model)
    labels = read_labels(args.labels) if args.labels else y
    training = read_rows(args.training_data)[0] if args.training_data else None
    sign_key = None
    if args.sign_key:
        from edgeml.keys import load_private_key

        sign_key = load_private_key(args.sign_key)
    try:
        report = convert_estimator(
            model, X, name=args.name, version=args.version, features=features,
            window=args.window, input_shape=args.input_shape, training_data=training,
            labels=labels, quantize=args.quantize, sign_key=sign_key, out=args.output,
            tolerance=args.tolerance, self_test_rows=args.self_test_rows,
            description=args.description, converter=args.converter,
            portable=args.older_devices,
        )
    except ParityMismatch as exc:
        print(exc.report.summary())
        raise
    print(report.summary())
    if sign_key is not None:
        from edgeml.keys import key_id

        print(f"signed with key {key_id(sign_key.public_key())}")
    return 0
