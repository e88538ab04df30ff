"""One record for the rows of one message, and back: the pure functions behind grouped
records (the egress and collector tests use them on real records)."""

from __future__ import annotations

import pytest

from edgeml.storage.outbox.grouping import (
    GROUP_MAX_ROWS,
    expand_group,
    group_record,
    message_spans,
)


def rec(seq: int, row: int, **extra) -> dict:
    r = {"id": f"s{seq}.{row}", "topic": "t", "pipeline": "p", "model": "m", "version": "1",
         "output": {"label": row % 2}, "ts": 1.0, "input_seq": seq, **extra}
    if row:
        r["row"] = row
    return r


def test_spans_are_runs_of_one_message_that_share_every_other_field():
    recs = [rec(1, 0), rec(1, 1), rec(1, 2, true_label="a"), rec(2, 0), rec(2, 1, ts=2.0),
            rec(3, 0)]
    assert message_spans(recs) == [(0, 3), (3, 4), (4, 5), (5, 6)]
    assert message_spans([]) == []
    grouped = group_record(recs[0:3])
    assert "rows" in grouped and "id" not in grouped and "output" not in grouped
    assert grouped["rows"][2] == {"row": 2, "id": "s1.2", "output": {"label": 0},
                                  "true_label": "a"}
    # a grouped record is never grouped again
    assert message_spans([grouped, grouped]) == [(0, 1), (1, 2)]


def test_a_run_is_cut_at_the_row_limit():
    recs = [rec(9, i) for i in range(2 * GROUP_MAX_ROWS + 5)]
    assert message_spans(recs) == [(0, GROUP_MAX_ROWS), (GROUP_MAX_ROWS, 2 * GROUP_MAX_ROWS),
                                   (2 * GROUP_MAX_ROWS, 2 * GROUP_MAX_ROWS + 5)]


def test_a_grouped_record_that_does_not_hold_together_is_refused():
    good = {"pipeline": "gait", "model": "m", "version": "1", "input_seq": 5,
            "rows": [{"row": 0, "id": "a", "output": 1}, {"row": 1, "id": "b", "output": 2}]}
    rid = "d/gait/5.0-1/m/1/outputs"
    assert [r for r, _ in expand_group(rid, good)] == ["d/gait/5/m/1/outputs",
                                                         "d/gait/5.1/m/1/outputs"]
    for bad_id, rec, why in [
            ("d/gait/5.0-2/m/1/outputs", good, "is not that of rows 0-1"),
            (rid, {**good, "rows": []}, "non-empty list"),
            (rid, {**good, "rows": [1, 2]}, "non-empty list"),
            ("d/gait/5.0-0/m/1/outputs", {**good, "rows": [{"row": 0}, {"row": 0}]},
             "appears twice"),
            ("gait/5.0-1/m/1", good, "six parts")]:
        with pytest.raises(ValueError, match=why):
            expand_group(bad_id, rec)


def test_a_rows_own_fields_come_from_its_element_never_from_the_shared_ones():
    """A grouped record that also carries ``id``, ``output``, ``row`` or ``true_label`` at the
    top (no device writes that) cannot overwrite what each row says of itself."""
    rec = {"pipeline": "p", "model": "m", "version": "1", "input_seq": 5, "id": "forged",
           "output": "forged", "row": 7, "true_label": "forged",
           "rows": [{"row": 0, "id": "a", "output": 1}, {"row": 1, "id": "b", "output": 2}]}
    rows = expand_group("d/p/5.0-1/m/1/outputs", rec)
    assert [r for _, r in rows] == [
        {"id": "a", "pipeline": "p", "model": "m", "version": "1", "input_seq": 5,
         "output": 1},
        {"id": "b", "pipeline": "p", "model": "m", "version": "1", "input_seq": 5,
         "output": 2, "row": 1}]
