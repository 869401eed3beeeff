"""write_npy and overwrite_npy write exactly what np.save writes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from sagmq.storage.files import overwrite_npy, write_npy

ARRAYS = [
    np.ones((3, 3), np.float32),
    np.arange(10, dtype=">i4"),
    np.array(3.5),
    np.zeros((2, 0, 3)),
    np.ones((4, 5), np.float64).T,  # Fortran order: np.save's own path
    np.array([1 + 2j], np.complex64),
    np.ones(3, dtype=[("a", "<f4"), ("b", "<i2")]),  # structured: np.save's own path
    np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2],  # not contiguous
    np.ones((1000,), np.float16),
]


def np_save_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("arr", ARRAYS, ids=[f"{a.dtype}-{a.shape}" for a in ARRAYS])
def test_write_npy_writes_the_bytes_np_save_writes(arr: np.ndarray) -> None:
    for _ in range(2):  # the second time from the header cache
        buf = io.BytesIO()
        write_npy(buf, arr)
        assert buf.getvalue() == np_save_bytes(arr)


def test_overwrite_npy_replaces_the_file_whatever_its_old_size(tmp_path: Path) -> None:
    path = tmp_path / "best_numpy.npy"
    for arr in (np.ones(1000, np.float32), np.full(1000, 2, np.float32), np.arange(5, dtype=np.float32),
                np.zeros((40, 40), np.float64)):
        overwrite_npy(path, arr)
        assert path.read_bytes() == np_save_bytes(arr)
    overwrite_npy(tmp_path / "plain", np.ones(2))  # np.save adds the suffix too
    assert (tmp_path / "plain.npy").read_bytes() == np_save_bytes(np.ones(2))
