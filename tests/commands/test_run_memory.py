"""``edgeml run`` caps glibc's malloc at one arena: every thread that allocates would otherwise
get an arena of its own that keeps freed memory (measured ~7 MB with 3 versions)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
    reason="glibc only")

PROBE = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    from edgeml.commands.run import one_malloc_arena
    capped = one_malloc_arena() if sys.argv[1] == "cap" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(4)
    def work():
        p = libc.malloc(4096)  # this thread's first malloc picks (or makes) its arena
        barrier.wait()
        libc.free(p)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(capped, open(path).read().count("<heap nr="))
""")


def arenas(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_one_arena_for_all_threads_when_capped():
    capped, n = arenas("cap")
    assert capped == "True" and n == 1
    _, uncapped = arenas("plain")
    assert uncapped > 1  # the probe does make threads with arenas of their own


def test_the_environment_wins(monkeypatch):
    from edgeml.commands.run import one_malloc_arena

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert one_malloc_arena() is False
