"""One reader for a folder of safetensors files: every tensor's dtype and shape from the headers
(read once, no tensor data), a tensor's data only when asked for, and why a file cannot be read.
Export, the index check and validation all read stored tensors through it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

WEIGHT_GLOB = "*.safetensors"
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MEMMAP_DTYPES = {"BF16": np.uint16, "F16": np.uint16, "I32": np.int32}  # raw bits, as memory maps hold them


class StoredTensors:
    """The tensors of `folder` by name. `rename` gives the name each stored key goes by here (None leaves
    it out, e.g. the towers of a text-only build); `skip_unreadable` leaves out files that cannot be read
    (validation names them itself: `why_unreadable`)."""

    def __init__(self, folder: Path, rename: Callable[[str], str | None] | None = None, skip_unreadable: bool = False):
        self.files: dict[str, Path] = {}
        self.headers: dict[str, tuple[str, list[int]]] = {}  # name -> (safetensors dtype, shape)
        self._stored_as: dict[str, str] = {}
        for path in sorted(Path(folder).glob(WEIGHT_GLOB)):
            try:
                headers = _headers(path)
            except Exception:  # safetensors raises SafetensorError, OSError or ValueError by cause
                if skip_unreadable:
                    continue
                raise
            for key, header in headers.items():
                if (name := rename(key) if rename else key) is not None:
                    self.files[name], self._stored_as[name], self.headers[name] = path, key, header

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(self._stored_as[name])

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows `rows` of a tensor, read without loading the rest of it."""
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            return f.get_slice(self._stored_as[name])[rows]

    def memmap(self, name: str) -> np.memmap:
        """A BF16/F16 or I32 matrix as a read-only memory map of its bytes in the file ([rows, columns] uint16 or
        int32): rows are read from disk, by the page, only when indexed. safetensors' own slices read contiguous
        ranges only; a lookup table needs any set of rows (the gap this fills)."""
        import json
        import struct

        dtype, shape = self.headers[name]
        if dtype not in MEMMAP_DTYPES or len(shape) != 2:
            raise ValueError(f"{name}: a memory map is for {', '.join(MEMMAP_DTYPES)} matrices, not {dtype} {shape}")
        path = self.files[name]
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            start, end = json.loads(f.read(length))[self._stored_as[name]]["data_offsets"]
        if end - start != self.nbytes(name) or 8 + length + end > path.stat().st_size:
            raise ValueError(f"{path.name}: {name} does not fit in the file (truncated or damaged copy)")
        return np.memmap(path, dtype=MEMMAP_DTYPES[dtype], mode="r", offset=8 + length + start, shape=tuple(shape))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one file open at a time."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, path in self.files.items():
            by_file.setdefault(path, []).append(name)
        for path, names in by_file.items():
            with safe_open(path, "pt") as f:
                for name in names:
                    yield name, f.get_tensor(self._stored_as[name])

    def nbytes(self, name: str) -> int:
        dtype, shape = self.headers[name]
        return math.prod(shape) * DTYPE_BYTES[dtype]

    def data_bytes(self) -> int:
        """Bytes of tensor data, headers excluded."""
        return sum(self.nbytes(name) for name in self.headers)


def _headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import safe_open

    headers = {}
    with safe_open(path, "pt") as f:
        for key in f.keys():
            view = f.get_slice(key)
            headers[key] = (view.get_dtype(), list(view.get_shape()))
    return headers


def why_unreadable(path: Path) -> str | None:
    """None if the safetensors file's header and tensor table can be read, else why not (a truncated copy)."""
    try:
        _headers(path)
    except Exception as err:  # safetensors raises SafetensorError, OSError or ValueError by cause
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None
