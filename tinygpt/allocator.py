"""Keep freed buffers in the process: a setting for programs that own theirs (CLI, benchmarks).

glibc's malloc gives a freed buffer of a few MiB back to the kernel, so the next call's buffer of
the same size is fresh memory, and every 4 KiB page of it costs a page fault and a zeroing on
first write: about 1 µs each on a 2-core VM. The hand-written attention allocates its `(b h i j)`
scores, masked scores and weights anew on every call (the fused kernel allocates none): at the
`baby` size glibc's default often keeps up 2,000-5,000 faults per forward, 10-20% of its time.
With both thresholds raised, glibc keeps those buffers and reuses them; the price is that the
process holds on to memory it once needed (up to 1 GiB of it) instead of returning it.
Importing tinygpt never does this: it changes the whole process, so only a program's entry point
(the tinygpt command, the benchmarks) should decide it.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit. Buffers larger than
# that (the t×t weights past about 1,500 positions at `baby` width) still come and go by mmap.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True if applied, False where malloc is not glibc's.

    Both are needed: setting one turns off glibc's own adjustment of the other, and the trim
    threshold alone leaves every buffer above 128 KiB to mmap, which is worse than the default.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols, glibc's among them (no library search)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
