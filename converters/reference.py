"""The bundle's reference profile, made on the host from the training data (``edgeml convert
--training-data``): what the device's drift watch compares live windows with.

Per input channel (for window models: per channel over every sample of every window) quantile
bin edges with frequencies, min/max, missing rate, mean and std; per model output the label
frequencies and the distribution of one score per row (a classifier's top-class probability,
an anomaly model's score, a regressor's prediction). The numbers are made by
:func:`edgeml.core.drift.make_reference`, the same code the device and ``edgeml replay`` bin
with. Layout: docs/bundle-format.md, "reference".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeml.core.drift import DEFAULT_BINS, make_reference

log = logging.getLogger("converters.reference")

MAX_ROWS = 100_000  # beyond this an evenly spaced subset of the training rows is profiled


def build_reference(estimator: Any, analysis: Any, training_data: np.ndarray,
                    features: Sequence[str], window: int | None, *,
                    bins: int = DEFAULT_BINS) -> dict[str, Any] | None:
    from converters.parity import reference_outputs

    td = np.asarray(training_data, dtype=np.float64)
    width = (window or 1) * len(features)
    if td.ndim == 1 or td.size % width or (td.ndim >= 2 and td[0].size != width):
        log.warning("training data of shape %s does not hold rows of %d values (%d features "
                    "x window %d): the bundle gets no drift reference", list(td.shape), width,
                    len(features), window or 1)
        return None
    rows = td.reshape(len(td), width)
    if len(rows) > MAX_ROWS:
        rows = rows[np.linspace(0, len(rows) - 1, MAX_ROWS).astype(int)]
    kind = analysis.spec.kind
    if not np.isfinite(rows).all():  # the model cannot score missing values: profile inputs only
        return make_reference(rows, features, window, kind=kind, bins=bins)
    out = reference_outputs(estimator, analysis, rows)
    return make_reference(rows, features, window, kind=kind, labels=out.labels,
                          scores=out.scores, bins=bins)
