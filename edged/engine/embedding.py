"""The token embedding table, read from disk a row at a time.

Why not a Gather in the graph: a decode step needs one 600-byte row of a 30 MB
table. onnxruntime maps external data, and every row touched faults in the
pages around it too (the kernel maps up to 64 KB of cached file per fault), so
a few hundred distinct tokens made ~16-30 MB of the table resident. Reading the
rows with pread() keeps the table in the page cache, which the kernel can
reclaim, and out of the process's resident memory: nothing is mapped.

File format (written by models/quantize.py, little-endian):
    header  8s magic b"EDGEDEMB", u32 version, u32 vocab, u32 hidden, u32 block
    rows    vocab x (float32 scales[hidden / block], int8 values[hidden])
A row dequantizes to values * scale of its block (symmetric int8, like the
weights). One row is contiguous, so a token costs one pread.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import numpy as np

from edged.errors import ModelCorrupt

MAGIC = b"EDGEDEMB"
VERSION = 1
_HEADER = struct.Struct("<8sIIII")
FILENAME = "embedding.bin"


def write_table(path: Path | str, values: np.ndarray, scales: np.ndarray) -> None:
    """values int8 [vocab, hidden]; scales float32 [vocab, hidden / block]."""
    vocab, hidden = values.shape
    block = hidden // scales.shape[1]
    if values.dtype != np.int8 or scales.shape != (vocab, hidden // block) or block * scales.shape[1] != hidden:
        raise ValueError("embedding table: int8 values [vocab, hidden] and float32 scales [vocab, hidden/block]")
    rows = np.empty((vocab, 4 * scales.shape[1] + hidden), np.uint8)
    rows[:, : 4 * scales.shape[1]] = np.ascontiguousarray(scales, "<f4").view(np.uint8)
    rows[:, 4 * scales.shape[1] :] = values.view(np.uint8)
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, vocab, hidden, block))
        f.write(rows.tobytes())


class EmbeddingTable:
    def __init__(self, path: Path | str):
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ModelCorrupt(f"embedding table {self.path}: {e.strerror}") from None
        head = os.pread(self._fd, _HEADER.size, 0)
        if len(head) != _HEADER.size or head[:8] != MAGIC:
            os.close(self._fd)
            raise ModelCorrupt(f"{self.path} is not an edged embedding table")
        _, version, self.vocab, self.hidden, self.block = _HEADER.unpack(head)
        if version != VERSION or not self.block or self.hidden % self.block:
            os.close(self._fd)
            raise ModelCorrupt(f"{self.path}: unsupported embedding table (version {version})")
        self._nblocks = self.hidden // self.block
        self._row = 4 * self._nblocks + self.hidden
        size = os.fstat(self._fd).st_size
        if size != _HEADER.size + self.vocab * self._row:
            os.close(self._fd)
            raise ModelCorrupt(f"{self.path}: truncated embedding table ({size} bytes)")
        self._lock = threading.Lock()  # os.pread is thread-safe; close() is not

    def rows(self, ids) -> np.ndarray:
        """Token ids of any shape -> float32 embeddings of shape ids.shape + (hidden,)."""
        ids = np.asarray(ids, dtype=np.int64)
        shape = ids.shape + (self.hidden,)
        if ids.size == 1:  # a decode step
            return self._read(int(ids.reshape(-1)[0])).reshape(shape)
        out = np.empty((ids.size, self._nblocks, self.block), np.float32)
        for i, t in enumerate(ids.reshape(-1).tolist()):
            out[i] = self._read(t)
        return out.reshape(shape)

    def _read(self, token: int) -> np.ndarray:
        # One row, with as few numpy calls as possible. Why: a decode step's row is read
        # right after a step whose weight stream has emptied the CPU caches, where numpy
        # calls cost ~10x their warm time (SmolLM2 decode: ~180 us per row for the former
        # vectorised path, ~130 us for this one, 12 us for either in a warm loop).
        if not 0 <= token < self.vocab:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.vocab - 1})")
        raw = os.pread(self._fd, self._row, _HEADER.size + token * self._row)
        scales = np.frombuffer(raw, "<f4", self._nblocks)
        values = np.frombuffer(raw, np.int8, offset=4 * self._nblocks).reshape(self._nblocks, self.block)
        return values * scales[:, None]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
