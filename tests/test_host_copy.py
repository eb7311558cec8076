"""The threaded frame copy is np.copyto, whatever the split, and leaves no threads behind."""
import threading

import numpy as np
import pytest

from iadgpt.runtime.host_copy import MIN_PARALLEL_BYTES, ThreadedCopy, default_copy_threads


def _copy_threads() -> int:
    return sum(t.name.startswith("iadgpt-frame-copy") for t in threading.enumerate())


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1080, 1920, 3), (3, 97, 641, 3), (1, 5, 400_000, 3), (2, 8, 8, 3)])
def test_threaded_copy_equals_copyto(threads, shape):
    rng = np.random.default_rng(sum(shape) + threads)
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    dst = np.zeros_like(src)
    copy = ThreadedCopy(threads)
    try:
        copy(dst, src)
        np.testing.assert_array_equal(dst, src)
        strided = np.ascontiguousarray(src[:, :, ::-1])[:, :, ::-1]  # same pixels, negative strides
        dst[...] = 0
        copy(dst, strided)
        np.testing.assert_array_equal(dst, src)
    finally:
        copy.close()
    assert _copy_threads() == 0


def test_large_copies_use_the_pool_and_small_ones_do_not():
    copy = ThreadedCopy(3)
    small = np.ones((1, 8, 8, 3), np.uint8)
    copy(np.empty_like(small), small)
    assert copy._pool is None and small.nbytes < MIN_PARALLEL_BYTES
    big = np.ones((1, 1080, 1920, 3), np.uint8)
    copy(np.empty_like(big), big)
    assert copy._pool is not None and _copy_threads() == 2  # the caller copies the first chunk itself
    copy.close()
    assert _copy_threads() == 0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        ThreadedCopy(2)(np.empty((1, 4, 4, 3), np.uint8), np.empty((1, 4, 5, 3), np.uint8))


@pytest.mark.parametrize("cpus,threads", [(1, 1), (2, 1), (8, 2), (16, 4), (64, 4)])
def test_default_threads_are_a_quarter_of_the_cores_at_most_four(cpus, threads):
    assert default_copy_threads(cpus) == threads
