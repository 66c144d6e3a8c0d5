"""Host memory: make glibc give large freed buffers back to the system (each rank and the verify/merge process)."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's malloc option that sets the size above which a block is mmap'ed (and so returned to the system when freed).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value


def return_large_frees_to_the_system() -> None:
    """Fix glibc's mmap threshold at its initial 128 KiB. Left alone, glibc raises it after the first large free (up
    to 32 MiB), so from then on a step's activation and logit buffers come from the heap, which keeps their memory
    after they are freed: a 4 x 256-token step of SmolLM2-135M on CPU peaked at 5.72 GiB resident, against 4.06 GiB
    with the threshold fixed, at the same speed (benchmarks/README.md). Host memory only; no-op without glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass
