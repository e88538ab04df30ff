"""Models trained on the real data sets, and bundles made from them, for any test to use.

Plain functions (tests/conftest.py wraps them in fixtures). Nothing is cached here: training is
deterministic for a given ``seed``, so a test can retrain the same model to get scikit-learn's
own answers and compare them with what a bundle scores on the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeml.host.datasets import (
    BASICMOTIONS_CHANNELS,
    BASICMOTIONS_WINDOW,
    load_basicmotions,
    load_daphnet,
)

ACTIVITY_KINDS = ("logreg", "forest", "mlp")


def _activity_classifier(kind: str, seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    if kind == "logreg":
        return LogisticRegression(max_iter=2000, random_state=seed)
    if kind == "forest":
        return RandomForestClassifier(n_estimators=50, random_state=seed)
    if kind == "mlp":
        return MLPClassifier(hidden_layer_sizes=(32,), solver="lbfgs", max_iter=2000,
                             random_state=seed)
    raise ValueError(f"kind must be one of {ACTIVITY_KINDS}, not {kind!r}")


def train_activity_model(kind: str = "logreg", seed: int = 0):
    """Pipeline WindowFeatures(6) -> StandardScaler -> classifier, fitted on the BasicMotions
    TRAIN windows as the device feeds them: flat ``[n, 100 * 6]``, sample-major."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from converters import WindowFeatures

    train = load_basicmotions("TRAIN")
    model = Pipeline([
        ("features", WindowFeatures(n_channels=len(BASICMOTIONS_CHANNELS))),
        ("scale", StandardScaler()),
        ("classify", _activity_classifier(kind, seed)),
    ])
    return model.fit(train.flat(), np.asarray(train.y))


def build_activity_bundle(tmp_dir: Path, kind: str = "logreg", name: str = "activity",
                          version: str = "1", sign_key=None, *, seed: int = 0,
                          input_shape: str = "flat", quantize: bool = False) -> Path:
    """Train :func:`train_activity_model` and convert it; the parity sample is the whole
    BasicMotions TEST set (40 windows). Returns ``tmp_dir/<name>-<version>.edgeml``."""
    from converters import convert_estimator

    train, test = load_basicmotions("TRAIN"), load_basicmotions("TEST")
    model = train_activity_model(kind, seed)
    accuracy = float(np.mean(model.predict(test.flat()) == np.asarray(test.y)))
    report = convert_estimator(
        model, test.flat(), name=name, version=version, features=BASICMOTIONS_CHANNELS,
        window=BASICMOTIONS_WINDOW, input_shape=input_shape, training_data=train.flat(),
        labels=np.asarray(test.y), metrics={"test_accuracy": accuracy}, quantize=quantize,
        sign_key=sign_key, out=Path(tmp_dir) / f"{name}-{version}.edgeml",
        description=f"BasicMotions activity ({kind}) on raw 100 x 6 windows",
    )
    return report.path


def train_gait_anomaly_model(seed: int = 0):
    """IsolationForest on single Daphnet samples (9 accelerometer channels); 25 trees keep the
    graph near 700 nodes instead of ~2,700 for the default 100."""
    from sklearn.ensemble import IsolationForest

    return IsolationForest(n_estimators=25, random_state=seed).fit(load_daphnet().X)


def build_gait_anomaly_bundle(tmp_dir: Path, version: str = "1", *, name: str = "gait",
                              sign_key=None) -> Path:
    """Convert :func:`train_gait_anomaly_model`; parity on every 10th Daphnet sample.
    Outputs ``label`` (1 normal, -1 anomaly) and ``scores`` (decision_function)."""
    from converters import convert_estimator

    data = load_daphnet()
    report = convert_estimator(
        train_gait_anomaly_model(), data.X[::10], name=name, version=version,
        features=data.channels, training_data=data.X, sign_key=sign_key,
        out=Path(tmp_dir) / f"{name}-{version}.edgeml",
        description="Daphnet gait anomaly (IsolationForest) on single samples",
    )
    return report.path


def score_bundle(bundle, X: np.ndarray, *, trusted_keys=()) -> tuple[np.ndarray, np.ndarray]:
    """Run a bundle (path, bytes or :class:`edgeml.bundle.Bundle`) with onnxruntime the way a
    device does: rows reshaped to the manifest's input shape, outputs picked by the names the
    manifest gives. Returns ``(labels [n], scores [n, k])``; a regressor's predictions are
    both (its manifest names no scores output)."""
    import onnxruntime as ort

    from edgeml.bundle import Bundle, read_bundle

    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle, trusted_keys=trusted_keys)
    spec, outs = bundle.manifest.input, bundle.manifest.outputs
    arr = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    if len(spec.shape) == 3:
        arr = arr.reshape(len(arr), spec.window, len(spec.features))
    session = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    names = [outs.label] if outs.scores is None else [outs.label, outs.scores]
    results = session.run(names, {spec.name: arr})
    labels, scores = results if len(results) == 2 else (results[0], results[0])
    return np.asarray(labels).reshape(-1), np.asarray(scores).reshape(len(arr), -1)
