"""The trainer's CPU heap setting: freed activation-sized buffers leave the resident set (they stayed in glibc's heap
before), and a user's MALLOC_MMAP_THRESHOLD_ is left alone. Each case in a fresh process: mallopt is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Free an 8 MiB buffer first (glibc then raises its mmap threshold to 8 MiB), then allocate and touch 50 more, keep
# the last (so the heap cannot shrink from the top), free the rest, and print how much of them is still resident.
PROBE = """
import ctypes, sys
from lorafinetune.trainer import heap
applied = heap.release_freed_buffers() if sys.argv[1] == "set" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
page = 4096
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * page
size = 8 << 20
libc.free(libc.malloc(size))
before = resident()
buffers = [libc.malloc(size) for _ in range(50)]
for b in buffers:
    ctypes.memset(b, 1, size)
for b in buffers[:-1]:
    libc.free(b)
print(applied, (resident() - before) / (50 * size))
"""


def _probe(mode: str, **env: str) -> tuple[bool, float]:
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**base, **env})  # fmt: skip
    applied, kept = out.stdout.split()
    return applied == "True", float(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")  # fmt: skip
def test_freed_buffers_leave_the_resident_set_unless_the_user_chose_a_threshold():
    applied, kept = _probe("leave")
    assert not applied and kept > 0.9, f"glibc's default keeps them: {kept:.0%} still resident"
    applied, kept = _probe("set")
    assert applied and kept < 0.05, f"{kept:.0%} of the freed buffers still resident"
    applied, _ = _probe("set", MALLOC_MMAP_THRESHOLD_="33554432")
    assert not applied
