"""Process-wide memory tuning shared by training and extraction on CPU."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """glibc malloc: serve every allocation from the heap and never hand freed memory back to the kernel.

    By default each large tensor (a training step's activations and gradients: GBs at base size; an image's res5
    activations in extraction: 200 MB each) is a fresh mmap whose pages the kernel must fault in and zero, every
    time; with this the next step / image reuses them. The cost: the process's RSS stays at its peak. Process-wide
    and irreversible; what PyTorch's CPU tuning guides get from jemalloc/tcmalloc.
    Returns False (and does nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_top_pad, 256 << 20)
    return True
