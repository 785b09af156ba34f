"""Small h5py helpers shared by the store's writer and reader: strings, dataset walks, sizes."""
from __future__ import annotations

from typing import Dict, List, Sequence

import h5py
import numpy as np

STR = h5py.string_dtype()
CHUNK_BYTES = 1 << 16  # small rows are grouped up to this size; a larger map is one chunk per row
META_BYTES = 1 << 18  # room reserved for HDF5's own metadata on every write (object headers, B-trees, heaps)


def decode_strings(values) -> List[str]:
    """Strings read back from an h5py string dataset (bytes or str) as a list of str."""
    return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values]


def is_str(ds: h5py.Dataset) -> bool:
    return h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind in "OS"


def _decoded(data) -> np.ndarray:
    """An h5py string array of any shape as an object array of str, same shape."""
    data = np.asarray(data, dtype=object)
    return np.array(decode_strings(data.ravel()), dtype=object).reshape(data.shape)


def read(ds: h5py.Dataset, start: int = 0, stop=None) -> np.ndarray:
    """Rows start:stop of a dataset, strings decoded to an object array of str."""
    if is_str(ds):
        return _decoded(ds[start:stop] if ds.shape else [ds[()]])
    return ds[start:stop] if ds.shape else ds[()]


def read_all(ds: h5py.Dataset) -> np.ndarray:
    """A whole (fixed) dataset, strings decoded."""
    return _decoded(ds[()]) if is_str(ds) else ds[()]


def fixed_strings(values, width=None, name: str = "", cut: bool = False) -> np.ndarray:
    """Strings as a fixed-length bytes array (UTF-8) of `width` bytes (default: the longest, at
    least 1). A longer string is cut when `cut` (at a character boundary, marked "..."), else
    raises ValueError naming the dataset."""
    encoded = [str(v).encode() for v in np.asarray(values, dtype=object).ravel()]
    if width is None:
        width = max([len(e) for e in encoded] + [1])
    for i, e in enumerate(encoded):
        if len(e) > width:
            if not cut:
                raise ValueError(f"{name}: a string of {len(e)} bytes does not fit its {width}-byte dataset: {e[:80]!r}...")
            encoded[i] = e[: width - 3].decode(errors="ignore").encode() + b"..."
    return np.array(encoded, dtype=f"S{width}").reshape(np.shape(values))


def datasets(group: h5py.Group) -> Dict[str, h5py.Dataset]:
    """Every dataset below `group`, by its path relative to it."""
    found: Dict[str, h5py.Dataset] = {}
    group.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def is_row_dataset(ds: h5py.Dataset) -> bool:
    """Grows with rows (resizable along its first axis)."""
    return bool(ds.maxshape) and ds.maxshape[0] is None


def chunk_shape(row_shape: Sequence[int], itemsize: int) -> tuple:
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * itemsize
    return (max(1, CHUNK_BYTES // max(row_bytes, 1)),) + tuple(row_shape)


def data_bytes(data) -> int:
    """The bytes an array takes in the file, uncompressed: strings as their length + 64 each."""
    data = np.asarray(data)
    return sum(len(str(v)) + 64 for v in data.ravel()) if data.dtype.kind in "OUS" else data.nbytes


def append_bytes(columns: Dict[str, np.ndarray]) -> int:
    """An upper bound on the bytes one appended batch may add to the file: twice the raw data (lzf
    can grow incompressible data a little), one chunk per dataset (HDF5 rewrites a partly filled
    chunk elsewhere) and room for metadata."""
    from pipeline.store.layout import string_width

    return META_BYTES + sum(2 * (len(data) * string_width(name) if np.asarray(data).dtype.kind in "OUS"
                                 else data_bytes(data)) + CHUNK_BYTES for name, data in columns.items())


def write_fixed(group: h5py.Group, name: str, data: np.ndarray) -> None:
    """A dataset that does not grow with rows: strings as variable-length text, large arrays lzf."""
    data = np.asarray(data)
    if data.dtype.kind in "OUS":  # fixed-length bytes: nothing in HDF5's global heap
        strings = fixed_strings(data)
        group.create_dataset(name, data=strings, compression="lzf" if strings.nbytes > 1024 else None)
    else:
        group.create_dataset(name, data=data, compression="lzf" if data.size > 1024 else None)
