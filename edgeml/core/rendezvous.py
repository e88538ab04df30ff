"""Where the results of every model version meet and one answer is picked (pure logic).

Roles: ``champion`` answers; ``challenger`` is scored, recorded and the first fallback;
``canary`` is the last-resort fallback and the agreement reference; ``shadow`` never answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ANSWERING = ("champion", "challenger")
FALLBACK_ORDER = {"champion": 0, "challenger": 1, "canary": 2}


@dataclass(frozen=True)
class Outcome:
    """One version's result for one batch, as the rendezvous sees it at decision time."""

    name: str
    version: str
    role: str
    priority: int
    outputs: list[dict] | None = None  # per-row output fields; None when it failed or is late
    labels: list | None = None
    scores: np.ndarray | None = None
    classes: tuple | None = None
    error: str | None = None
    done_at: float = 0.0  # monotonic completion time, for the ``first`` policy
    elapsed_ms: float | None = None  # the model's own scoring time for the batch

    @property
    def ok(self) -> bool:
        return self.outputs is not None


@dataclass(frozen=True)
class Answer:
    output: dict | None
    model: str
    version: str
    fallback: bool
    error: str | None = None


class AnswerColumn(Sequence[Answer]):
    """Every row answered by one version: its outputs, one :class:`Answer` per row when
    read. Egress packs such answers straight from the version's packed outputs."""

    __slots__ = ("fallback", "outcome")

    def __init__(self, outcome: Outcome, fallback: bool) -> None:
        self.outcome, self.fallback = outcome, fallback

    def __len__(self) -> int:
        return len(self.outcome.outputs or ())

    def __getitem__(self, i: Any) -> Any:
        o = self.outcome
        if isinstance(i, slice):
            return [Answer(out, o.name, o.version, self.fallback)
                    for out in (o.outputs or [])[i]]
        return Answer(o.outputs[i], o.name, o.version, self.fallback)  # type: ignore[index]

    def __iter__(self) -> Iterator[Answer]:
        o, flag = self.outcome, self.fallback
        return iter([Answer(out, o.name, o.version, flag) for out in o.outputs or ()])


def ready(policy: str, done: Sequence[Outcome], pending_roles: Sequence[str]) -> bool:
    """Can the policy answer now, before the deadline, given what is done and what is not?"""
    pending_answering = [r for r in pending_roles if r in ANSWERING]
    if policy == "first":
        return any(o.ok and o.role in ANSWERING for o in done) or not pending_answering
    if policy == "champion":
        if any(o.ok and o.role == "champion" for o in done):
            return True
        return "champion" not in pending_roles and not pending_answering
    # vote, mean: everyone who may answer has answered
    return not pending_answering


def decide(policy: str, outcomes: Sequence[Outcome], n_rows: int, *, top_n: int = 2,
           champion_configured: bool = True) -> Sequence[Answer]:
    ok = [o for o in outcomes if o.ok]
    if policy == "first":
        cands = sorted((o for o in ok if o.role in ANSWERING), key=lambda o: o.done_at)
        if cands:
            return AnswerColumn(cands[0], False)
        return _fallback(ok, outcomes, n_rows)
    if policy == "champion":
        champ = [o for o in ok if o.role == "champion"]
        if champ:
            return AnswerColumn(champ[0], False)
        return _fallback(ok, outcomes, n_rows, flag=champion_configured)
    voters = sorted((o for o in ok if o.role in ANSWERING), key=lambda o: o.priority)
    if not voters:
        return _fallback(ok, outcomes, n_rows)
    champion_voted = any(o.role == "champion" for o in voters)
    if policy == "vote":
        return _vote(voters, n_rows, fallback=champion_configured and not champion_voted)
    if policy == "mean":
        return _mean(voters[:top_n], n_rows, fallback=champion_configured and not champion_voted)
    raise ValueError(f"unknown policy {policy!r}")


def _fallback(ok: Sequence[Outcome], outcomes: Sequence[Outcome], n_rows: int,
              flag: bool = True) -> Sequence[Answer]:
    cands = sorted((o for o in ok if o.role in FALLBACK_ORDER),
                   key=lambda o: (FALLBACK_ORDER[o.role], o.priority))
    if cands:
        return AnswerColumn(cands[0], flag)
    errors = "; ".join(f"{o.name} {o.version}: {o.error or 'late'}" for o in outcomes) or \
        "no model version is active"
    return [Answer(None, "", "", True, f"no answer within the deadline ({errors})")] * n_rows


def _vote(voters: Sequence[Outcome], n_rows: int, fallback: bool) -> list[Answer]:
    answers: list[Answer] = []
    for i in range(n_rows):
        labels = [_hashable(o.outputs[i].get("label")) for o in voters]  # type: ignore[index]
        counts = Counter(labels)
        best = max(counts.values())
        # ties go to the label of the highest-priority voter among the tied labels
        winner = next(lab for lab in labels if counts[lab] == best)
        o = next(v for v, lab in zip(voters, labels, strict=True) if lab == winner)
        out = dict(o.outputs[i])  # type: ignore[index]
        out["votes"] = {str(k): v for k, v in counts.items()}
        answers.append(Answer(out, o.name, o.version, fallback))
    return answers


def _mean(chosen: Sequence[Outcome], n_rows: int, fallback: bool) -> list[Answer]:
    with_scores = [o for o in chosen if o.scores is not None]
    if not with_scores:
        return _vote(chosen, n_rows, fallback)
    ref = with_scores[0]
    same = [o for o in with_scores
            if o.scores.shape == ref.scores.shape and o.classes == ref.classes]  # type: ignore[union-attr]
    avg = np.mean([o.scores for o in same], axis=0)
    model = "+".join(o.name for o in same)
    version = "+".join(o.version for o in same)
    classes = ref.classes
    answers = []
    for i in range(n_rows):
        row = avg[i].tolist()
        if classes and len(classes) == len(row):
            label = classes[int(np.argmax(avg[i]))]
            out: dict[str, Any] = {"label": label,
                                   "scores": dict(zip(map(str, classes), row, strict=True))}
        else:
            out = {"score": row[0] if len(row) == 1 else row}
        out["members"] = len(same)
        answers.append(Answer(out, model, version, fallback))
    return answers


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v
