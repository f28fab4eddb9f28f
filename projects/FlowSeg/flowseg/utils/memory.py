"""Resident memory (RSS) of this process, for CPU measurements of tools and tests.

PyTorch's CPU allocator keeps no statistics (``torch.cuda.max_memory_allocated`` has no CPU
counterpart) and ``tracemalloc`` sees only Python objects, so CPU peaks are read from the
kernel: ``VmRSS`` / ``VmHWM`` of ``/proc/self/status``. Linux lets a process reset its own high
water mark (``/proc/self/clear_refs``, value 5), which turns the process-wide peak into the peak
of one measured stretch. Elsewhere the peak falls back to ``resource``'s ``ru_maxrss`` (never
reset; :func:`reset_peak_rss` then returns False).
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import sys
from typing import Optional

__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak_rss", "release_free_memory", "PeakRSS"]

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()  # no /proc: the best available figure


def peak_rss_bytes() -> int:
    """Peak resident set size since the start (or the last :func:`reset_peak_rss`), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel, so that memory freed by
    one measurement does not hide the next one's growth."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc
            pass


class PeakRSS:
    """``with PeakRSS() as m: ...`` -> ``m.start`` (RSS at entry), ``m.peak`` (highest RSS inside,
    bytes), ``m.extra`` (``peak - start``: what the block needed on top of what was resident) and
    ``m.exact`` (False when the peak could not be reset: it is then the process-wide peak)."""

    def __init__(self) -> None:
        self.start = self.peak = self.extra = 0
        self.exact = False

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.exact = reset_peak_rss()
        self.start = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(peak_rss_bytes(), self.start)
        self.extra = self.peak - self.start
