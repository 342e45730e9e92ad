"""Peak memory of a block of code: CUDA's allocator peak on GPU, sampled resident memory on CPU.

On CPU the process-lifetime peak (``ru_maxrss``) cannot be reset, and several grid points may run in
one process, so a thread samples the resident set size every few milliseconds inside the block and
reports the peak above the level at entry: the memory the block itself needed. Freed heap memory
that the C allocator still holds would be reused without raising the RSS (and make the number
depend on what ran before), so it is handed back to the OS first (glibc ``malloc_trim``).
"""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc only; elsewhere a no-op), after a garbage collection."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the lifetime peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (and ``m.absolute_peak_bytes``)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self.absolute_peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            release_free_heap()
            self._base = current_rss_bytes()
            self.absolute_peak_bytes = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.absolute_peak_bytes = max(self.absolute_peak_bytes, current_rss_bytes())

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            self.absolute_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.absolute_peak_bytes = max(self.absolute_peak_bytes, current_rss_bytes())
        self.peak_bytes = self.absolute_peak_bytes - self._base
        return False
