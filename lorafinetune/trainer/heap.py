"""On a CPU, activations and logits are malloc'ed buffers, and glibc's heap keeps what is freed: after the first
large free it raises its mmap threshold (up to 32 MiB), so from the second step on a step's buffers come from the
heap, whose freed pages stay resident. The resident set then grew 30-170 % above the live tensors (benchmarks/README,
the memory plan): more than `lorafinetune plan` says, or than a memory limit sized by it allows.

A threshold fixed at 4 MiB sends the large buffers (a 4 x 512 x 576 fp32 hidden state is 4.5 MiB, an MLP activation
3x that) to mmap, which gives them back when freed, and leaves the many smaller ones in the heap. Measured side by
side (benchmarks/README): the 4 x 512 peaks fell 21-58 % to within 12 % of the plan, with no loss of speed on the
quick start; 1 MiB was within 15 % everywhere but 6 % slower there, and 128 KiB 10-35 % slower (page faults on every
buffer). What the heap still keeps of the smaller buffers (about one more step's worth) the plan counts.
"""

from __future__ import annotations

import ctypes
import os

from lorafinetune.contract import CPU_MMAP_THRESHOLD_BYTES

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable: a user who sets it keeps their choice


def release_freed_buffers() -> bool:
    """Fix glibc's mmap threshold at 4 MiB for this process. False if left alone: another C library (musl, macOS),
    or the user set MALLOC_MMAP_THRESHOLD_."""
    if ENV_OVERRIDE in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD_BYTES))
