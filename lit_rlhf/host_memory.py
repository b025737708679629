"""Host (CPU) memory: hand large freed blocks back to the operating system at once."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def mmap_large_allocations(threshold_bytes: int = 4 * 2**20) -> bool:
    """Serve host allocations of at least ``threshold_bytes`` with ``mmap``; True when it took effect.

    glibc raises this threshold on its own as large blocks are freed, after which big tensors come from
    the heap and their memory stays with the process, fragmented, after they are freed. PPO allocates
    vocabulary-sized tensors of changing shapes every iteration, so on CPU that slack piles up into a
    much higher peak resident memory. A fixed threshold returns such blocks to the system when freed.
    A no-op (False) where the C library is not glibc.
    """
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
