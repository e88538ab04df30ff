"""The egress stage's batch encoding: record ids made per scored batch, results packed from
the scoring columns and published answers reused must give exactly the bytes and ids that
packing each record on its own gives (upstream collectors and the dedup window rely on them)."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import numpy as np

from edgeml.core.assemble import Row
from edgeml.core.egress import (
    Egress,
    _packed_results,
    _packed_run,
    msgpack_bytes,
    row_record_id,
    row_record_ids,
)
from edgeml.core.rendezvous import Outcome
from edgeml.core.scoring import ResultRecords
from edgeml.host.datasets import load_basicmotions
from edgeml.storage.outbox import Outbox, encode_record, pack_record
from edgeml.storage.outbox.grouping import expand_group, message_spans

DATA = load_basicmotions("TEST")


def rows(n: int = 9, *, odd_id: object = None) -> list[Row]:
    """Rows from the real data set: batch messages (sub rows), labels on some, odd ids."""
    t = time.time()
    out = []
    for i in range(n):
        out.append(Row(features=np.asarray(DATA.X[i], dtype=np.float32).ravel(),
                       id=f"msg/{i}" if i % 2 else 5000 + i, topic="sensors/w%1/imu",
                       seq=100000 + i // 3, received=t + (i // 3) / 1000,
                       label=str(DATA.y[i]) if i % 3 == 0 else None, sub=i % 3))
    if odd_id is not None:
        out[4] = Row(features=out[4].features, id=odd_id, topic=out[4].topic, seq=out[4].seq,
                     received=out[4].received, label=None, sub=out[4].sub)
    return out


def outcomes(n: int) -> list[Outcome]:
    classes = sorted(set(DATA.y))
    ok = [{"label": str(DATA.y[i]),
           "scores": {c: np.float32(0.5 if c == DATA.y[i] else 0.1) for c in classes}}
          for i in range(n)]
    return [Outcome("activity/x", "2%", "champion", 0, outputs=ok, elapsed_ms=0.41234),
            Outcome("activity", "3", "shadow", 2, error="scoring failed: boom"),
            Outcome("activity", "4", "canary", 1, outputs=[{"value": 1.5}] * n),
            Outcome("activity", "5", "challenger", 3, error="bad outputs", elapsed_ms=2.0)]


def test_batch_ids_are_the_per_record_ids():
    recs = [{"pipeline": p, "model": m, "version": v, "input_seq": seq,
             **({"row": row} if row is not None else {})}
            for p in ("activity", "a/b") for m in ("m", "m%1") for v in ("1", "2/3")
            for seq in (0, 7, 12345678901234, "7/8", True) for row in (None, 0, 2)]
    for device in ("watch-01", "w/1"):
        for stream in ("outputs", "results"):
            assert row_record_ids(device, recs, stream) == [
                row_record_id(device, r, stream) for r in recs]


def stored(run) -> list[tuple[str, dict]]:
    """What a run stores, expanded back into per-row records (the collector's view)."""
    out = []
    for rid, part in zip(run.ids, run.parts, strict=True):
        rec = msgpack.unpackb(part, strict_map_key=False)
        assert rec.pop("record_id") == rid
        out += expand_group(rid, rec) if "rows" in rec else [(rid, rec)]
    return out


def plain(records: list[dict]) -> list[dict]:
    """Records as msgpack gives them back (numpy values as plain numbers)."""
    return [msgpack.unpackb(encode_record(r), strict_map_key=False) for r in records]


def test_results_packed_from_columns_are_byte_for_byte_the_records():
    batch = rows()
    for late in (False, True):
        rr = ResultRecords("gait/1", batch, outcomes(len(batch)), late)
        run = _packed_results("watch-01", rr)
        records = list(rr)
        assert len(records) == len(rr) == 4 * len(batch)
        # the columns give exactly the bytes the records give, grouped per message
        ref = _packed_run("watch-01", "results", records)
        assert run.ids == ref.ids and run.parts == ref.parts
        # three messages of three rows, four versions: one record per message and version
        assert len(run.ids) == 4 * 3
        assert run.ids[0] == "watch-01/gait%2F1/100000.0-2/activity%2Fx/2%25/results"
        # ... standing for exactly the per-row records, ids included
        back = stored(run)
        assert [rid for rid, _ in back] == row_record_ids("watch-01", records, "results")
        assert [rec for _, rec in back] == plain(records)
        assert {r["late"] for r in records} == {late}
        assert records[1]["row"] == 1 and records[0]["true_label"] == str(DATA.y[0])
    # what a version shares is packed once and kept: a new role must not reuse the old bytes
    promoted = [Outcome("activity", "4", "champion", 0, outputs=[{"value": 2.5}] * len(batch))]
    rr = ResultRecords("gait/1", batch, promoted, False)
    ref = _packed_run("watch-01", "results", list(rr))
    assert _packed_results("watch-01", rr).parts == ref.parts
    assert {r["role"] for _, r in stored(ref)} == {"champion"}


def test_rows_of_one_message_group_only_with_every_shared_field_equal():
    """A message's rows become one record only where they share all but their own fields;
    single rows stay as they were, and a row answered by another version starts a record."""
    batch = rows(6)
    answers = [{"id": r.id, "topic": r.topic, "pipeline": "gait", "model": "m",
                "version": "2" if i == 5 else "1", "output": {"label": "Walking"},
                "policy": "champion", "fallback": i == 5, "latency_ms": 1.5,
                "ts": r.received, "input_seq": r.seq, **({"row": r.sub} if r.sub else {})}
               for i, r in enumerate(batch)]
    run = _packed_run("watch-01", "outputs", answers)
    assert run.ids == ["watch-01/gait/100000.0-2/m/1/outputs",
                       "watch-01/gait/100001.0-1/m/1/outputs",
                       "watch-01/gait/100001.2/m/2/outputs"]
    back = stored(run)
    assert [rid for rid, _ in back] == row_record_ids("watch-01", answers, "outputs")
    assert [rec for _, rec in back] == plain(answers)
    # a field only some rows have, or lack, splits the run too
    extra = [dict(answers[0]), dict(answers[1], error="x"), dict(answers[2])]
    missing = [dict(answers[0]), dict(answers[1]), dict(answers[2])]
    del missing[2]["policy"]
    assert message_spans(extra) == [(0, 1), (1, 2), (2, 3)]
    assert message_spans(missing) == [(0, 2), (2, 3)]
    assert message_spans(answers[:3]) == [(0, 3)]
    single = [dict(answers[0], input_seq=7), dict(answers[3], input_seq=8)]
    run = _packed_run("watch-01", "outputs", single)
    assert run.ids == ["watch-01/gait/7/m/1/outputs", "watch-01/gait/8/m/1/outputs"]
    assert run.parts == [pack_record(rid, rec) for rid, rec in zip(run.ids, single,
                                                                   strict=True)]


def test_a_result_that_cannot_be_packed_is_refused_alone(tmp_path: Path):
    batch = rows(odd_id=object())  # one message id msgpack cannot encode
    run = _packed_results("watch-01", ResultRecords("gait", batch, outcomes(len(batch)), False))
    assert run.parts is None and len(run.records) == 4 * len(batch)
    with Outbox(tmp_path / "outbox") as ob:
        res = ob.put_groups([run.group()])
        assert res.stored == 4 * (len(batch) - 1)  # every version's record of that row alone
        assert ob.stats()["unencodable"] == 4


def test_published_answers_are_stored_with_the_record_id_spliced_in():
    eg = Egress(device="watch-01", topic=lambda *p: "/".join(p), outbox=object(),
                record_results=True, out_formats={"gait": "msgpack"}, out_qos={"gait": 0},
                on_status_changed=lambda: None)
    answers = [{"id": r.id, "topic": r.topic, "pipeline": "gait", "model": "m", "version": "1",
                "output": {"label": "Walking"}, "policy": "champion", "fallback": False,
                "latency_ms": 1.5, "ts": r.received, "input_seq": r.seq + 10 * i}
               for i, r in enumerate(rows())]  # single-row messages: one record each
    answers[2]["output"] = {"score": np.float32(0.5)}  # published as str(): not reusable
    published = []
    for rec in answers:
        payload = eg._pack_answer(rec)
        assert payload == msgpack_bytes(rec)  # what subscribers get is unchanged
        published.append(payload if eg._answer_plain else None)
    assert published[2] is None and all(p is not None for i, p in enumerate(published)
                                        if i != 2)
    run = _packed_run("watch-01", "outputs", answers, published)
    ids = row_record_ids("watch-01", answers, "outputs")
    assert run.ids == ids
    assert run.parts == [pack_record(rid, rec) for rid, rec in zip(ids, answers, strict=True)]


def test_a_message_of_several_rows_is_one_array_answer_and_one_grouped_record():
    """Rows of one message are answered as one array, built from each row's packed answer;
    the outbox stores one grouped record per message, standing for exactly each row's
    record (a row whose answer needed ``str()`` too)."""
    import msgpack

    runs: list = []
    eg = Egress(device="watch-01", topic=lambda *p: "/".join(p), outbox=object(),
                record_results=True, out_formats={"gait": "msgpack"}, out_qos={"gait": 0},
                on_status_changed=lambda: None)
    eg._queue = runs.append  # what would go to the writer thread

    sent: list[bytes] = []
    calls: list[str] = []

    class Wire:
        def publish_nowait(self, topic, payload, qos=0, retain=False):
            sent.append(payload)
            calls.append("publish")

        def flush(self):
            calls.append("flush")

    eg.transport = Wire()
    answers = [{"id": r.id, "topic": r.topic, "pipeline": "gait", "model": "m",
                "version": "1", "output": {"label": "Walking"}, "policy": "champion",
                "fallback": False, "latency_ms": 1.5, "ts": r.received, "input_seq": r.seq,
                **({"row": r.sub} if r.sub else {})} for r in rows()]
    answers[4]["output"] = {"score": np.float32(0.5)}  # packed with str(): not reusable
    eg.answers("gait", answers)
    assert len(sent) == 3  # nine rows of three messages: three array answers
    assert calls == ["publish"] * 3 + ["flush"]  # the batch's answers leave together, now
    for k, payload in enumerate(sent):
        assert payload == msgpack_bytes(answers[3 * k:3 * k + 3])
        assert [r["input_seq"] for r in msgpack.unpackb(payload)] == [
            answers[3 * k]["input_seq"]] * 3
    (run,) = runs
    assert len(run.ids) == 3
    back = stored(run)
    assert [rid for rid, _ in back] == row_record_ids("watch-01", answers, "outputs")
    assert [rec for _, rec in back] == plain(answers)


def test_a_long_message_makes_grouped_records_of_at_most_a_hundred_rows():
    """A 250-sample message: three grouped records (0-99, 100-199, 200-249) per version, the
    columns and the records agreeing, standing for exactly its 250 rows."""
    t = time.time()
    batch = [Row(features=np.asarray(DATA.X[i % 40], dtype=np.float32).ravel(), id=f"s{i}",
                 topic="sensors/w1/imu", seq=42, received=t, label=None, sub=i)
             for i in range(250)]
    rr = ResultRecords("gait", batch, [
        Outcome("gait", "1", "champion", 0, outputs=[{"label": str(DATA.y[i % 40])}
                                                     for i in range(250)], elapsed_ms=0.3),
        Outcome("gait", "2", "shadow", 2, error="scoring failed: boom")], False)
    run = _packed_results("watch-01", rr)
    ref = _packed_run("watch-01", "results", list(rr))
    assert run.ids == ref.ids and run.parts == ref.parts
    assert [i.split("/")[2] for i in run.ids] == ["42.0-99", "42.100-199", "42.200-249"] * 2
    back = stored(run)
    assert [rid for rid, _ in back] == row_record_ids("watch-01", list(rr), "results")
    assert [rec for _, rec in back] == plain(list(rr))


def _egress(fmt: str = "msgpack", *, wire: bool = True):
    """An egress with a wire that keeps what is published and a writer queue that keeps
    the runs."""
    runs: list = []
    sent: list[bytes] = []

    class Wire:
        def publish_nowait(self, topic, payload, qos=0, retain=False):
            sent.append(payload)

        def flush(self):
            pass

    eg = Egress(device="watch-01", topic=lambda *p: "/".join(p), outbox=object(),
                record_results=True, out_formats={"gait": fmt}, out_qos={"gait": 1},
                on_status_changed=lambda: None)
    eg._queue = runs.append
    eg.transport = Wire() if wire else None
    return eg, sent, runs


def _column_answers(batch, *, fallback=False, ids=None):
    from edgeml.core.outputs import Outputs
    from edgeml.core.rendezvous import AnswerColumn
    from edgeml.core.scoring import AnswerRecords

    n = len(batch)
    rng = np.random.default_rng(n)
    scores = rng.random((n, 4)).astype(np.float32)
    outputs = Outputs("scores", [["Walking", "Standing", 3][i % 3] for i in range(n)],
                      scores, ["Walking", "Standing", "Running", "3"])
    o = Outcome("gait/m", "1.0", "champion", 0, outputs=outputs, labels=outputs.labels,
                scores=scores, elapsed_ms=0.2)
    latency = [round(1.5 + (r.received % 1), 3) for r in batch]
    return AnswerRecords("gait", batch, AnswerColumn(o, fallback), "champion", latency)


def test_answers_packed_from_columns_are_byte_for_byte_the_records():
    """One version answered every row: answers and their outputs records are packed from
    the columns, and must be exactly what packing each record gives (payloads, record
    ids, stored bytes), for messages of one row, several rows, more rows than one grouped
    record holds, with labels, odd ids and a fallback flag."""
    t = time.time()
    long = [Row(features=np.zeros(9, np.float32), id=f"s{i}", topic="sensors/w1/imu",
                seq=77, received=t, label=i if i % 5 == 0 else None, sub=i)
            for i in range(250)]
    singles = [Row(features=np.zeros(9, np.float32), id=i, topic=f"sensors/w{i}/imu",
                   seq=90 + i, received=t + i, label=None, sub=0) for i in range(3)]
    for batch, fallback, wire in [(rows(), False, True), (rows(odd_id="a/b%c"), True, True),
                                  (singles + long + rows(), False, True),
                                  (long[:201] + singles, False, True),  # a last run of one
                                  (rows(), False, False)]:
        fast, sent_fast, runs_fast = _egress(wire=wire)
        ar = _column_answers(batch, fallback=fallback)
        fast.answers("gait", ar)
        assert fast._rows_cache.rows is batch  # packed from the columns indeed
        slow, sent_slow, runs_slow = _egress(wire=wire)
        slow.answers("gait", list(ar.records()))
        assert sent_fast == sent_slow
        assert fast.published == slow.published
        assert fast._marks == slow._marks
        (run,), (ref,) = runs_fast, runs_slow
        assert run.ids == ref.ids
        assert run.parts == ref.parts
        back = stored(run)
        assert [rid for rid, _ in back] == row_record_ids("watch-01", ar.records(), "outputs")
        assert [rec for _, rec in back] == plain(ar.records())
    # the 250-row message: one answer of 250 rows, three grouped records
    fast, sent_fast, runs_fast = _egress()
    fast.answers("gait", _column_answers(long))
    assert len(sent_fast) == 1 and len(msgpack.unpackb(sent_fast[0])) == 250
    assert [i.split("/")[2] for i in runs_fast[0].ids] == ["77.0-99", "77.100-199",
                                                         "77.200-249"]
    # and the results of the same batch reuse the rows packed for its answers
    rr = ResultRecords("gait", long, [_column_answers(long).answers.outcome], False)
    assert _packed_results("watch-01", rr, fast._rows_cache).parts == \
        _packed_run("watch-01", "results", list(rr)).parts


def test_answers_that_cannot_go_from_the_columns_go_as_records():
    """JSON answers, and a value msgpack cannot pack as it is (packed with ``str()`` as
    before), take the record path, and nothing is published or stored twice."""
    batch = rows()
    eg, sent, runs = _egress("json")
    eg.answers("gait", _column_answers(batch))
    assert len(sent) == 3 and all(p.startswith(b"[{") for p in sent)
    assert len(runs) == 1 and len(runs[0].ids) == 3
    odd = rows(odd_id=np.int64(7))  # a numpy value: str() in the answer, as before
    eg, sent, runs = _egress()
    ar = _column_answers(odd)
    eg.answers("gait", ar)
    assert eg._rows_cache is None  # not from the columns
    assert len(sent) == 3 and len(runs) == 1
    assert msgpack.unpackb(sent[1])[1]["id"] == "7"
    assert sent == [msgpack_bytes(ar.records()[3 * k:3 * k + 3]) for k in range(3)]


def test_numbered_batches_pack_their_rows_as_one_slice_byte_for_byte():
    """The usual flood of numbered batch messages (ids "<n>:<row>", no true labels, a
    classifier with integer labels): each grouped record's rows are a slice of one array of
    every row's bytes. Answers, their outputs records and every version's results must still
    be exactly what packing each record gives; with a lone row between the messages, a
    failed version, and a batch whose ids change length (packed row by row)."""
    from edgeml.core.outputs import Outputs
    from edgeml.core.rendezvous import AnswerColumn
    from edgeml.core.scoring import AnswerRecords

    t = time.time()
    x = np.asarray(DATA.flat(), dtype=np.float32)

    def message(n: int, seq: int, k: int = 10) -> list[Row]:
        return [Row(x[(seq + i) % len(x)], f"{n}:{i}" if k > 1 else n, "sensors/w1/imu", seq,
                    t + seq / 1000, None, i) for i in range(k)]

    def outcome(batch, v: int, role: str) -> Outcome:
        rng = np.random.default_rng(v)
        scores = rng.random((len(batch), 3)).astype(np.float32)
        labels = scores.argmax(1).tolist()
        o = Outputs("scores", labels, scores, ["0", "1", "2"])
        return Outcome("gait", str(v), role, v, outputs=o, labels=labels, scores=scores,
                       elapsed_ms=0.1 * v)

    numbered = message(2000001, 10) + message(2000002, 11) + message(3, 12, k=1) \
        + message(2000004, 13)
    widths = message(999, 20) + message(1000, 21)  # "999:0" and "1000:0": two widths
    for batch, whole in ((numbered, True), (widths, False)):
        outs = [outcome(batch, 1, "champion"), outcome(batch, 2, "challenger"),
                Outcome("gait", "3", "shadow", 3, error="scoring failed: boom")]
        fast, sent_fast, runs_fast = _egress()
        ar = AnswerRecords("gait", batch, AnswerColumn(outs[0], False), "champion",
                           [1.25] * len(batch))
        fast.answers("gait", ar)
        fast.results("gait", ResultRecords("gait", batch, outs, False))
        assert (fast._rows_cache.elem_matrix() is not None) == whole
        slow, sent_slow, runs_slow = _egress()
        slow.answers("gait", list(ar.records()))
        slow.results("gait", list(ResultRecords("gait", batch, outs, False)))
        assert sent_fast == sent_slow
        assert [r.ids for r in runs_fast] == [r.ids for r in runs_slow]
        assert [r.parts for r in runs_fast] == [r.parts for r in runs_slow]
        # and they stand for the per-row records
        answers, results = stored(runs_fast[0]), stored(runs_fast[1])
        assert len(answers) == len(batch) and len(results) == 3 * len(batch)
        assert [rec["id"] for _, rec in answers] == [r.id for r in batch]
