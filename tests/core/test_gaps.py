"""SequenceGaps: gaps, late fills, duplicates, restarts and bounded memory (pure logic)."""

from __future__ import annotations

import pytest

from edgeml.core.gaps import SequenceGaps, sequence_number


def feed(g: SequenceGaps, numbers, source: str = "sensors/a/imu") -> SequenceGaps:
    for n in numbers:
        g.observe(source, (n,))
    return g


def test_sequence_numbers():
    assert [sequence_number(v) for v in (0, 17, 17.0, "17", "007")] == [0, 17, 17, 17, 7]
    for v in (None, True, -1, 1.5, "s0-17", "", "1e3", " 1", "٣", float("nan"), [1]):
        assert sequence_number(v) is None, v


def test_in_order_stream_has_no_gaps():
    g = feed(SequenceGaps(), range(1, 1001))
    st = g.status()
    assert st["numbered"] == 1000 and st["sources"] == 1
    assert (st["gaps"], st["missing"], st["lost"], st["duplicates"], st["resets"]) == (0,) * 5


def test_first_number_is_the_baseline_not_a_gap():
    g = feed(SequenceGaps(), [5000, 5001])
    assert g.gaps == 0 and g.missing == 0


def test_gaps_count_jumps_and_missing_numbers():
    g = feed(SequenceGaps(), [1, 2, 5, 6, 10])  # 3, 4 and 7, 8, 9 never arrive
    assert g.gaps == 2 and g.missing == 5 and g.open == 5 and g.lost == 0
    assert g.skipped == 5


def test_open_numbers_become_lost_beyond_the_reorder_window():
    g = feed(SequenceGaps(reorder_window=10), [1, 2, 5])  # 3, 4 open
    feed(g, range(6, 14))                                 # next 14: window floor 4
    assert (g.lost, g.open) == (1, 1)                     # 3 lost, 4 still open
    feed(g, [14])
    assert (g.lost, g.open, g.missing) == (2, 0, 2)
    feed(g, [3])  # far too late: already counted lost, so a repeat
    assert g.duplicates == 1 and g.lost == 2 and g.late == 0


def test_late_message_fills_the_gap_it_created():
    g = feed(SequenceGaps(), [1, 2, 6, 4])  # 3, 4, 5 skipped; 4 arrives late
    assert g.gaps == 1 and g.late == 1 and g.missing == 2 and g.skipped == 3
    feed(g, [3, 5])
    assert g.late == 3 and g.missing == 0 and g.open == 0 and g.lost == 0
    assert g.skipped == g.late + g.lost + g.open
    feed(g, [7, 8])
    assert g.gaps == 1 and g.duplicates == 0


def test_duplicates_are_not_gaps():
    g = feed(SequenceGaps(), [1, 2, 3, 3, 2, 4, 5, 5])
    assert g.duplicates == 3 and g.gaps == 0 and g.missing == 0


def test_restart_at_zero_or_one_is_a_reset_not_a_gap():
    g = feed(SequenceGaps(), [*range(1, 500), 1, 2, 3, 4])
    assert g.resets == 1 and g.gaps == 0 and g.missing == 0 and g.duplicates == 0
    g = feed(SequenceGaps(), [*range(0, 500), 0, 1, 2])
    assert g.resets == 1 and g.gaps == 0


def test_restart_closes_what_was_open_as_lost():
    g = feed(SequenceGaps(), [1, 2, 3, 7, 8, 1, 2, 3])  # 4, 5, 6 never came before it
    assert g.resets == 1 and g.lost == 3 and g.open == 0 and g.gaps == 1


def test_a_lone_repeat_of_the_first_message_is_a_duplicate():
    g = feed(SequenceGaps(), [1, 2, 3, 1, 4, 5])  # 1 redelivered, stream goes on
    assert g.resets == 0 and g.duplicates == 1 and g.gaps == 0 and g.missing == 0


def test_sources_are_counted_separately():
    g = SequenceGaps()
    for n in range(1, 11):
        g.observe("sensors/a/imu", (n,))
        if n % 2:
            g.observe("sensors/b/imu", (n,))  # b sends only odd numbers
    assert g.sources == 2 and g.gaps == 4 and g.missing == 4


def test_batch_ids_in_order_and_unnumbered_ids():
    g = SequenceGaps()
    g.observe("t", (1, 2, 3))
    g.observe("t", (5, 6))
    g.observe("t", ("s0-1", None))
    assert g.numbered == 5 and g.unnumbered == 2 and g.gaps == 1 and g.missing == 1


def test_a_batch_numbered_as_a_whole_counts_once():
    g = SequenceGaps()
    g.observe("t", ("7:0", "7:1", "7:2"))  # {"id": 7, "samples": [3 samples]}
    g.observe("t", ("8:0", "8:1"))
    g.observe("t", ("10:0",))             # batch 9 never came
    assert g.numbered == 3 and g.gaps == 1 and g.missing == 1 and g.duplicates == 0
    g.observe("t", ("s:0", "x7:1"))       # not numbers
    assert g.unnumbered == 2


def test_holes_per_source_are_bounded():
    g = SequenceGaps(max_holes=4)
    feed(g, range(0, 40, 2))  # 19 holes of one number each
    assert g.gaps == 19 and g.missing == 19
    assert g.open == 4 and g.lost == 15
    feed(g, [3])  # its hole was forgotten: counted lost already, so a repeat
    assert g.late == 0 and g.duplicates == 1


def test_sources_are_bounded_with_an_overflow_counter():
    g = SequenceGaps(max_sources=3)
    for s in range(10):
        g.observe(f"sensors/{s}/imu", (1,))
        g.observe(f"sensors/{s}/imu", (3,))  # one open number each
    assert g.sources == 3 and g.sources_evicted == 7
    assert g.lost == 7 and g.open == 3 and g.missing == 10
    g.observe("sensors/0/imu", (50,))  # forgotten: starts afresh, no gap
    assert g.gaps == 10


def test_settings_are_validated():
    with pytest.raises(ValueError, match="at least 1"):
        SequenceGaps(max_sources=0)


def test_the_whole_batch_shortcut_counts_as_the_id_by_id_walk():
    """A batch numbered as a whole is recognised at once; any other mix of ids (other batch
    numbers, own ids, text, odd separators) gives exactly the counts of the id-by-id walk."""
    import random

    rng = random.Random(3)
    pieces = ["7", "8", "007", "a", "a:7", "-1", "1.5", ""]
    for _ in range(2000):
        k = rng.randrange(2, 6)
        base = rng.choice(pieces)
        ids = []
        for i in range(k):
            r = rng.random()
            ids.append(f"{base}:{i}" if r < 0.7 else rng.choice(
                [f"{rng.choice(pieces)}:{i}", i, f"{base}:x", f"{base}:{i}:0", None]))
        shortcut, walk = SequenceGaps(), SequenceGaps()
        for n in range(3):  # a few messages, so gaps and duplicates are counted too
            shortcut.observe("t", tuple(ids))
            walk.observe("t", iter(list(ids)))  # not a tuple: id by id
            ids = [v.replace(base + ":", f"{n + 9}:", 1) if isinstance(v, str) else v
                   for v in ids]
        assert vars(shortcut) == vars(walk), ids
