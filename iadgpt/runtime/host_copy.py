"""Copying a camera frame into the GPU path's pinned input buffer with a few threads.

torch's own `Tensor.copy_` splits a large copy over its whole CPU pool (every core); a parallel copy
waits for its slowest thread, and on a host with other busy processes one of them is often
descheduled, so the copy takes a scheduler time slice or two (milliseconds) instead of a tenth of
one. One thread (`np.copyto`) has no one to wait for but moves ~6 MB at one core's bandwidth. A few
threads are the middle: most of the parallel speed, few threads to wait for. The workers block on a
queue between frames (no spinning), and the calling thread copies the first chunk itself.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

# Below this many bytes one thread is faster than handing chunks out (a thread handoff costs tens of us).
MIN_PARALLEL_BYTES = 1 << 20


def default_copy_threads(cpus: Optional[int] = None) -> int:
    """A quarter of the cores, 1 to 4: leaves the rest to the camera, the station and other processes."""
    if cpus is None:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // 4))


class ThreadedCopy:
    """`copy(dst, src)` = `np.copyto(dst, src)`, split by rows over `threads` threads."""

    def __init__(self, threads: Optional[int] = None) -> None:
        self.threads = default_copy_threads() if threads is None else max(1, int(threads))
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    def __call__(self, dst: np.ndarray, src: np.ndarray) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"copy of shape {src.shape} into a buffer of shape {dst.shape}")
        rows = dst.shape[0] * dst.shape[1] if dst.ndim >= 2 else 1
        if (self.threads == 1 or dst.nbytes < MIN_PARALLEL_BYTES or rows < self.threads
                or not dst.flags.c_contiguous):
            np.copyto(dst, src)
            return
        # rows over batch and height; views, no copies (the source may be any strided view)
        d = dst.reshape((rows,) + dst.shape[2:])
        s = src.reshape((rows,) + src.shape[2:]) if src.flags.c_contiguous else None
        if s is None:
            np.copyto(dst, src)  # a strided source cannot be split as one row axis without a copy
            return
        bounds = np.linspace(0, rows, self.threads + 1).astype(int)
        with self._lock:  # one copy at a time per buffer owner; the pool is started on first use
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="iadgpt-frame-copy")
            futures: list[Future] = [self._pool.submit(np.copyto, d[a:b], s[a:b])
                                     for a, b in zip(bounds[1:-1], bounds[2:])]
            np.copyto(d[bounds[0]:bounds[1]], s[bounds[0]:bounds[1]])
            for f in futures:
                f.result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
