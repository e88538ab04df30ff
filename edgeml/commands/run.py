"""``edgeml run``: the device daemon."""

from __future__ import annotations

import argparse
import gc
import os
import sys

SWITCH_INTERVAL_S = 0.0005  # see run(): bounds how long the loop waits for the GIL
#: objects allocated (net) between two young-generation collections (CPython's default: 700)
GC_YOUNG_THRESHOLD = 50_000
_M_ARENA_MAX = -8  # glibc's mallopt parameter

HELP = "run the device daemon (MQTT in, scored answers out)"
DESCRIPTION = """Run the edgeml daemon: subscribe to the sensor topics of every pipeline in the
config, score each message with every active model version, publish the answers, archive the
raw inputs and sync results upstream. SIGTERM/SIGINT drain in-flight work and exit 0;
SIGHUP re-reads the config and applies policy, deadline and model changes without a restart."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the TOML config (e.g. /etc/edgeml/edgeml.toml)")
    p.add_argument("--broker", metavar="URL",
                   help="override [broker] url, e.g. mqtt://127.0.0.1:1883 or mqtts://host:8883")
    p.add_argument("--data-dir", metavar="DIR",
                   help="override data_dir (models/, rawlog/, outbox/ live here)")
    p.add_argument("--check", action="store_true",
                   help="validate the config (and the profile it names) and exit")


def settle_heap() -> None:
    """Once the models are loaded: freeze what start-up made and collect the young
    generation less often.

    A flood keeps thousands of rows and records alive at once (queues, batches, the outbox's
    pending writes), and every collection walks the live ones: with CPython's defaults the
    collector ran for 0.143 s in a 30,000-message flood of ten-sample messages (about 5% of
    the daemon's CPU, charged in a py-spy profile to the lines that allocate), 0.017 s after.
    Start-up's objects (modules, sessions, the config) are never garbage: frozen, no
    collection walks them again. Nearly everything per message is freed by its reference
    count, not the collector, so the higher threshold holds little more memory (RSS after a
    paced stream unchanged).
    """
    gc.collect()
    gc.freeze()
    young, g1, g2 = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, young), g1, g2)


def one_malloc_arena() -> bool:
    """Cap glibc's malloc at one arena for this process; True when it was capped.

    glibc gives every thread that allocates an arena of its own and keeps what is freed there
    for reuse. The scoring threads, the outbox writer and the uplink's SQLite thread held
    ~7 MB that way (measured: RSS of a daemon with 3 versions, 89.8 against 97.9 MB after
    5,000 messages; no measurable CPU cost: the threads seldom allocate at the same time under
    the GIL). ``MALLOC_ARENA_MAX`` in the environment wins; other C libraries are left alone.
    Call it before threads are started."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from edgeml.config import load_config, load_device_profile

    config = load_config(args.config, broker_url=args.broker, data_dir=args.data_dir)
    profile = load_device_profile(config)
    if args.check:
        n_models = sum(len(p.models) for p in config.pipelines)
        print(f"{args.config}: OK (device {config.device_id}, profile {profile.name}, "
              f"{len(config.pipelines)} pipeline(s), {n_models} model slot(s))")
        return 0
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("edgeml").setLevel(logging.INFO)  # a daemon says what it does

    one_malloc_arena()
    from edgeml.core.device import Device

    def reload():
        return load_config(args.config, broker_url=args.broker, data_dir=args.data_dir)

    async def main() -> None:
        async with Device(config, profile=profile, reload=reload) as device:
            settle_heap()
            loop = asyncio.get_running_loop()
            reloads: set[asyncio.Task] = set()

            def on_hup() -> None:
                task = loop.create_task(device.reload(), name="reload")
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGTERM, device.request_stop)
            loop.add_signal_handler(signal.SIGINT, device.request_stop)
            loop.add_signal_handler(signal.SIGHUP, on_hup)
            await device.run()

    # The event loop does the socket I/O and the scoring; the outbox writer and the uplink
    # run Python in threads of their own. With the default 5 ms switch interval a message
    # arriving while one of them holds the GIL can wait up to 5 ms before the loop gets it
    # back: the tail latency of a paced stream. 0.5 ms bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    asyncio.run(main())
    return 0
