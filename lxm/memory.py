"""Process-wide memory tuning for CPU training and extraction: a program's setting, never a library call's.

`lxm pretrain`, `lxm finetune` and `lxm extract` call `keep_freed_memory()` once, before their work starts, when the
config's `keep_freed_memory` is true (the default) and the work runs on the CPU (`lxm.cli.common`). The library does
not: building a `Pretrainer` / `Finetuner` or calling `lxm.extract.pipeline.extract()` leaves malloc as it is, so a
notebook or a test process keeps its own. A script that trains or extracts on CPU through the library gets the
commands' behaviour by calling it first:

    from lxm.memory import keep_freed_memory
    keep_freed_memory()

torchtune's recipes apply their process settings the same way (`training/memory.py`, called from the recipe).
"""

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
