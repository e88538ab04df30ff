"""``edgeml run`` settles the heap once the models are loaded: start-up's objects frozen, the
young generation collected after 50,000 net allocations instead of 700 (a flood's queues of
live rows were walked by every collection)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import collections, gc, json, sys
    from edgeml.commands.run import settle_heap
    startup = [[i] for i in range(20_000)]  # modules, sessions, config: never garbage
    if sys.argv[1] == "settle":
        settle_heap()
    runs = collections.Counter()
    gc.callbacks.append(lambda phase, info: phase == "start" and runs.update(
        [info["generation"]]))
    queue = collections.deque()
    for i in range(200_000):  # a flood: rows live in a queue of 5,000 for a while
        queue.append((i, [i], {"row": i}))
        if len(queue) > 5_000:
            queue.popleft()
    # cyclic garbage is still collected without being asked for
    class Node:
        pass
    for _ in range(60_000):
        a, b = Node(), Node()
        a.b, b.a = b, a
    print(json.dumps({"runs": dict(runs), "frozen": gc.get_freeze_count(),
                      "threshold": gc.get_threshold()}))
""")


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_a_settled_heap_walks_a_floods_live_rows_far_less_often_and_still_collects_cycles():
    plain, settled = probe("plain"), probe("settle")
    assert settled["frozen"] >= 20_000 and plain["frozen"] == 0
    assert settled["threshold"][0] == 50_000
    plain_runs, settled_runs = plain["runs"].get("0", 0), settled["runs"].get("0", 0)
    assert plain_runs >= 100  # every 700 allocations, each walking the live queue
    assert 1 <= settled_runs <= plain_runs / 20  # the cycles alone set it off, as they should
