"""Prometheus exposition of a device's figures (served by :mod:`edgeml.core.http`).

One :class:`CollectorRegistry` per device (never the global ``REGISTRY``), holding one custom
collector that reads the counters the stages already keep, at scrape time: nothing is counted
twice on the hot path. Names and labels: docs/operations.md ("Metrics"). Label cardinality is
bounded: versions are the active set's, streams the outbox's, sources at most
:data:`MAX_SOURCE_SERIES` per pipeline, dead-letter reasons the decoder's fixed set.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from edgeml import __version__
from edgeml.core.drift import BATCH_LE
from edgeml.core.stats import LATENCY_BUCKETS_MS

log = logging.getLogger("edgeml.core.metrics")

MAX_SOURCE_SERIES = 32
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EventCounter:
    """Control's event sink with counts: deploy events by stage and alerts by kind, for
    /metrics; everything is passed on to the real sink (the egress stage) unchanged."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self.deploy_events: collections.Counter = collections.Counter()
        self.alerts: collections.Counter = collections.Counter()

    def publish(self, topic: str, doc: dict) -> None:
        self._sink.publish(topic, doc)

    def deploy_event(self, event: dict) -> None:
        self.deploy_events[str(event.get("stage"))] += 1
        self._sink.deploy_event(event)

    def alert(self, pipeline: str, kind: str, detail: dict) -> None:
        self.alerts[kind] += 1
        self._sink.alert(pipeline, kind, detail)

    def status_changed(self) -> None:
        self._sink.status_changed()


def _hist_buckets(hist: list[int], bounds_s: tuple[float, ...]) -> list[tuple[str, float]]:
    out, acc = [], 0
    for le, n in zip(bounds_s, hist, strict=False):
        acc += n
        out.append((repr(float(le)), acc))
    acc += hist[len(bounds_s)]
    out.append(("+Inf", acc))
    return out


_LAT_S = tuple(b / 1000.0 for b in LATENCY_BUCKETS_MS)


class DeviceCollector:
    """Reads a :class:`~edgeml.core.device.Device` when scraped."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def describe(self):  # no auto-describe: nothing to collect before the device runs
        return []

    def collect(self):
        try:
            yield from self._collect()
        except Exception:  # a scrape must never take the device down
            log.exception("metrics collection failed")

    def _collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        dev = self.device
        C, G, H = CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def fam(kind, name, doc, labels=()):
            return kind(name, doc, labels=list(labels))

        info = InfoMetricFamily("edgeml_build", "edgeml version, device and profile")
        info.add_metric([], {"version": __version__, "device": dev.config.device_id,
                             "profile": str(getattr(dev.profile, "name", ""))})
        yield info
        up = fam(G, "edgeml_ready", "1 when connected and every pipeline has loaded, "
                                     "self-tested models")
        up.add_metric([], 1.0 if dev.readiness()[0] else 0.0)
        yield up

        P = ("pipeline",)
        V = ("pipeline", "model", "version", "role")
        received = fam(C, "edgeml_messages_received", "Messages routed to a pipeline", P)
        accepted = fam(C, "edgeml_messages_accepted", "Messages decoded and archived", P)
        dlq = fam(C, "edgeml_dead_letters", "Rejected messages by reason", (*P, "reason"))
        rows = fam(C, "edgeml_rows", "Rows assembled and queued for scoring", P)
        qdrop = fam(C, "edgeml_queue_dropped_rows", "Rows dropped by the bounded queue", P)
        qwaits = fam(C, "edgeml_queue_waits", "Times input waited for room in the full queue "
                                              "(policy wait: the broker held the rest)", P)
        qdepth = fam(G, "edgeml_queue_depth_rows", "Rows waiting to be scored", P)
        answered = fam(C, "edgeml_rows_answered", "Rows answered by the rendezvous", P)
        fallbacks = fam(C, "edgeml_fallbacks", "Answers not from the policy's first choice "
                                               "(fallback)", P)
        unanswered = fam(C, "edgeml_unanswered", "Rows no version answered", P)
        published = fam(C, "edgeml_answers_published", "Answers published on out/", P)
        perr = fam(C, "edgeml_pipeline_errors", "Batches that failed in the pipeline", P)
        gaps = fam(C, "edgeml_input_gaps", "Rate intervals in which a known source sent "
                                           "nothing", P)
        sq_gaps = fam(C, "edgeml_sequence_gaps", "Jumps in a sender's own message numbers "
                                                  "(id), per source topic", P)
        sq_lost = fam(C, "edgeml_sequence_lost", "Numbered messages missing beyond the "
                                                  "reorder window (lost)", P)
        sq_open = fam(G, "edgeml_sequence_missing_open", "Numbered messages missing that may "
                                                         "still arrive late", P)
        sq_late = fam(C, "edgeml_sequence_late", "Numbered messages that arrived late and "
                                                  "filled a gap", P)
        sq_dup = fam(C, "edgeml_sequence_duplicates", "Numbered messages seen before "
                                                      "(not gaps)", P)
        sq_reset = fam(C, "edgeml_sequence_resets", "Senders that started numbering again", P)
        sq_src = fam(G, "edgeml_sequence_sources", "Source topics whose numbering is "
                                                   "followed", P)
        sq_evict = fam(C, "edgeml_sequence_sources_evicted", "Sources forgotten (too many "
                                                             "sources)", P)
        evicted = fam(C, "edgeml_windows_evicted", "Partial windows evicted (too many "
                                                   "sources)", P)
        batch = fam(H, "edgeml_batch_size_rows", "Rows per scored micro-batch", P)
        ans_lat = fam(H, "edgeml_answer_latency_seconds", "Arrival to answer", P)
        scored = fam(C, "edgeml_rows_scored", "Rows scored per version", V)
        verr = fam(C, "edgeml_scoring_errors", "Rows a version failed to score", V)
        late = fam(C, "edgeml_deadline_misses", "Rows a version scored after the deadline "
                                                "(late)", V)
        skipped = fam(C, "edgeml_rows_skipped", "Rows a busy version skipped", V)
        won = fam(C, "edgeml_version_answers", "Rows answered by this version", V)
        vfall = fam(C, "edgeml_version_fallbacks", "Rows this version answered as a "
                                                   "fallback", V)
        vlat = fam(H, "edgeml_scoring_seconds", "Per version, per batch scoring time", V)
        a_bytes = fam(G, "edgeml_archive_bytes", "Raw-input log bytes on disk", P)
        a_segs = fam(G, "edgeml_archive_segments", "Raw-input log segments", P)
        a_recs = fam(C, "edgeml_archive_records_appended", "Records appended to the raw-input "
                                                           "log", P)
        a_werr = fam(C, "edgeml_archive_write_errors", "Raw-input log write errors", P)
        a_lost = fam(C, "edgeml_archive_records_lost", "Records lost by the raw-input log", P)
        a_rm = fam(C, "edgeml_archive_records_removed", "Records removed by retention", P)
        d_psi = fam(G, "edgeml_drift_psi", "Input PSI of the last drift window", (*P, "channel"))
        d_ks = fam(G, "edgeml_drift_ks", "Input binned KS of the last drift window",
                   (*P, "channel"))
        d_oor = fam(G, "edgeml_drift_out_of_range_ratio", "Share of the last window outside "
                                                          "the training range", (*P, "channel"))
        o_psi = fam(G, "edgeml_output_drift_psi", "Output PSI of the last output window",
                    ("pipeline", "model", "version", "output"))
        d_win = fam(C, "edgeml_drift_windows", "Closed input drift windows", P)
        d_alerts = fam(G, "edgeml_drift_alerts_active", "Drift/health alerts raised and not "
                                                        "cleared", (*P, "kind"))
        d_raised = fam(C, "edgeml_drift_alerts_raised", "Drift/health alerts raised", P)
        stuck = fam(G, "edgeml_sensor_stuck_channels", "Source channels constant over the "
                                                      "last window", P)
        rate = fam(G, "edgeml_source_rate_samples_per_second", "Samples per second per source "
                   f"(at most {MAX_SOURCE_SERIES} per pipeline)", (*P, "source"))

        for p in dev.pipelines:
            name = p.config.name
            st = p.runtime.stats
            received.add_metric([name], st.received)
            accepted.add_metric([name], st.accepted)
            for reason, n in st.rejected_by_reason.items():
                dlq.add_metric([name, str(reason)], n)
            rows.add_metric([name], st.rows)
            qdrop.add_metric([name], st.dropped)
            qwaits.add_metric([name], st.queue_waits)
            qdepth.add_metric([name], p.runtime.queue_depth)
            answered.add_metric([name], st.scored)
            fallbacks.add_metric([name], st.fallbacks)
            unanswered.add_metric([name], st.unanswered)
            published.add_metric([name], dev.egress.published.get(name, 0))
            perr.add_metric([name], st.errors)
            evicted.add_metric([name], p.inlet.assembler.evicted_windows)
            sq = st.sequence
            sq_gaps.add_metric([name], sq.gaps)
            sq_lost.add_metric([name], sq.lost)
            sq_open.add_metric([name], sq.open)
            sq_late.add_metric([name], sq.late)
            sq_dup.add_metric([name], sq.duplicates)
            sq_reset.add_metric([name], sq.resets)
            sq_src.add_metric([name], sq.sources)
            sq_evict.add_metric([name], sq.sources_evicted)
            ring = st.answer_latency
            ans_lat.add_metric([name], _hist_buckets(ring.hist, _LAT_S), ring.total_ms / 1e3)
            for m in p.runtime.members:
                vs = st.version(m.name, m.version)
                lab = [name, m.name, m.version, m.role]
                scored.add_metric(lab, vs.rows)
                verr.add_metric(lab, vs.errors)
                late.add_metric(lab, vs.late)
                skipped.add_metric(lab, vs.skipped)
                won.add_metric(lab, vs.answered)
                vfall.add_metric(lab, vs.fallbacks)
                vlat.add_metric(lab, _hist_buckets(vs.latency.hist, _LAT_S),
                                vs.latency.total_ms / 1e3)
            try:
                rs = p.inlet.rawlog.stats
                a_bytes.add_metric([name], rs.get("bytes_on_disk", 0))
                a_segs.add_metric([name], rs.get("segments", 0))
                a_recs.add_metric([name], rs.get("records_appended", 0))
                a_werr.add_metric([name], rs.get("write_errors", 0))
                a_lost.add_metric([name], rs.get("records_lost", 0))
                a_rm.add_metric([name], rs.get("records_removed", 0))
            except Exception:
                log.debug("raw-log stats unavailable for %s", name, exc_info=True)
            mon = dev.monitors.get(name)
            if mon is None:
                continue
            batch.add_metric([name], _hist_buckets([int(n) for n in mon.batch_sizes],
                                                   BATCH_LE), float(mon.rows))
            gaps.add_metric([name], mon.rates.gaps)
            cur = mon.current
            for ch, v in cur.get("psi", {}).items():
                d_psi.add_metric([name, ch], v)
            for ch, v in cur.get("ks", {}).items():
                d_ks.add_metric([name, ch], v)
            for ch, v in cur.get("out_of_range", {}).items():
                d_oor.add_metric([name, ch], v)
            for key, doc in mon.output_current.items():
                model, _, version = key.partition(":")
                for out in ("label_psi", "score_psi"):
                    if out in doc:
                        o_psi.add_metric([name, model, version, out[:-4]], doc[out])
            d_win.add_metric([name], mon.windows)
            d_raised.add_metric([name], mon.alerts_raised)
            active = collections.Counter(k for (k, _s), g in mon.gates.items() if g.active)
            for kind in ("input_drift", "output_drift", "out_of_range", "sensor_stuck",
                         "rate_drop"):
                d_alerts.add_metric([name, kind], active.get(kind, 0))
            stuck.add_metric([name], len(cur.get("stuck", [])))
            for src, r in list(mon.rates.status()["rates"].items())[:MAX_SOURCE_SERIES]:
                rate.add_metric([name, src], r)
        yield from (received, accepted, dlq, rows, qdrop, qwaits, qdepth, answered, fallbacks,
                    unanswered, published, perr, gaps, sq_gaps, sq_lost, sq_open, sq_late,
                    sq_dup, sq_reset, sq_src, sq_evict, evicted, batch, ans_lat, scored, verr,
                    late, skipped, won, vfall, vlat, a_bytes, a_segs, a_recs, a_werr, a_lost, a_rm,
                    d_psi, d_ks, d_oor, o_psi, d_win, d_alerts, d_raised, stuck, rate)

        # outbox, uplink, transport, control
        dlq_pub = fam(C, "edgeml_dead_letters_published", "Dead letters published on dlq")
        dlq_pub.add_metric([], dev.ingress.dead_letters)
        yield dlq_pub
        perrs = fam(C, "edgeml_publish_errors", "Answers, alerts or dead letters not published")
        perrs.add_metric([], dev.egress.publish_errors + dev.ingress.dead_letters_lost)
        yield perrs
        if dev.outbox is not None:
            ob = dev.outbox.stats()
            S = ("stream",)
            backlog = fam(G, "edgeml_outbox_backlog_records", "Records waiting to sync", S)
            oldest = fam(G, "edgeml_outbox_oldest_unsynced_age_seconds", "Age of the oldest "
                         "unsynced record", S)
            dropped = fam(C, "edgeml_outbox_dropped_records", "Records the outbox evicted", S)
            refused = fam(C, "edgeml_outbox_refused_records", "Records the outbox refused", S)
            ob_bytes = fam(G, "edgeml_outbox_bytes", "Outbox bytes used", S)
            for s, v in ob["streams"].items():
                backlog.add_metric([s], v["backlog"])
                oldest.add_metric([s], v["oldest_unsynced_age_s"] or 0.0)
                dropped.add_metric([s], v["dropped"])
                refused.add_metric([s], v["refused"])
                ob_bytes.add_metric([s], v["bytes"])
            budget = fam(G, "edgeml_outbox_budget_bytes", "Outbox disk budget")
            budget.add_metric([], ob["budget_bytes"])
            overflow = fam(C, "edgeml_outbox_overflow_dropped_records", "Records dropped "
                           "before the outbox (writer too far behind)")
            overflow.add_metric([], dev.egress.overflow)
            yield from (backlog, oldest, dropped, refused, ob_bytes, budget, overflow)
        if dev.uplink is not None:
            u = dev.uplink.stats
            g = fam(G, "edgeml_uplink_connected", "1 when the upstream link is up")
            g.add_metric([], 1.0 if u["connected"] else 0.0)
            sent = fam(C, "edgeml_uplink_records_sent", "Records acknowledged upstream")
            sent.add_metric([], u["records_sent"])
            batches = fam(C, "edgeml_uplink_batches_sent", "Batches acknowledged upstream")
            batches.add_metric([], u["batches_sent"])
            ub = fam(C, "edgeml_uplink_bytes_sent", "Bytes sent upstream")
            ub.add_metric([], u["bytes_sent"])
            ue = fam(C, "edgeml_uplink_errors", "Uplink errors")
            ue.add_metric([], u["errors"])
            inflight = fam(G, "edgeml_uplink_in_flight_records", "Records in the batch in "
                                                                 "flight")
            inflight.add_metric([], u["in_flight"])
            yield from (g, sent, batches, ub, ue, inflight)
            if u["last_ack_age_s"] is not None:
                age = fam(G, "edgeml_uplink_last_ack_age_seconds", "Seconds since the last "
                                                                   "upstream PUBACK")
                age.add_metric([], u["last_ack_age_s"])
                yield age
        t = dev.transport
        if t is not None:
            conn = fam(G, "edgeml_mqtt_connected", "1 when the device's broker connection is up")
            conn.add_metric([], 1.0 if t.connected else 0.0)
            cs = fam(C, "edgeml_mqtt_connects", "Broker connections made")
            cs.add_metric([], t.connects)
            ds = fam(C, "edgeml_mqtt_disconnects", "Broker connections lost")
            ds.add_metric([], t.disconnects)
            yield from (conn, cs, ds)
        ev = dev.events
        de = fam(C, "edgeml_deploy_events", "Deployment outcomes by stage", ("stage",))
        for stage, n in ev.deploy_events.items():
            de.add_metric([stage], n)
        rb = fam(C, "edgeml_rollbacks", "Automatic rollbacks by the post-promotion watch",
                 ("result",))
        rb.add_metric(["rolled_back"], ev.alerts.get("auto_rollback", 0))
        rb.add_metric(["failed"], ev.alerts.get("auto_rollback_failed", 0))
        yield from (de, rb)


def make_registry(device: Any):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeviceCollector(device))
    return registry


def exposition(registry: Any) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)
