"""``mmrprune-bench speed --data FILE.npz``: read and check a user's saved tokens.

Every array's ``.npy`` header is read and checked (names, dtypes, shapes, and that the
declared size matches the bytes stored and fits in memory) before any array is
allocated, so a malformed or hostile file is refused with one line that names the
file and the problem (:class:`TokenFileError`) instead of a traceback or a huge
allocation.
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from numpy.lib import format as npy_format

ACCEPTED = {"features": "float16/32/64 [B, N, D]", "importance": "numeric [B, N], optional",
            "lengths": "integer [B], optional"}
ACCEPTED_TEXT = ", ".join(f"{name} ({what})" for name, what in ACCEPTED.items())
HOW_TO_SAVE = "save it with numpy.savez(path, features=..., importance=..., lengths=...)"
FEATURE_ITEMSIZES = (2, 4, 8)   # float16 / float32 / float64: what torch holds
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK"
UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError)   # a damaged archive or member


class TokenFileError(ValueError):
    """A ``--data`` file that cannot be benchmarked; the message names the file and why."""


@dataclass
class TokenFile:
    features: np.ndarray                 # [B, N, D], native byte order
    importance: Optional[np.ndarray]     # [B, N] or None
    lengths: Optional[np.ndarray]        # [B] int64 or None
    ignored: list = field(default_factory=list)   # names of arrays that are not in ACCEPTED
    features_from: str = "features"      # the array read as features: another name when it is the only one


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, fail) -> tuple:
    """``(shape, dtype)`` from one member's ``.npy`` header, checked against the member's size."""
    name = info.filename[:-4]
    unreadable = f"array '{name}' cannot be read"
    try:
        with zf.open(info) as fp:
            version = npy_format.read_magic(fp)
            read_header = {(1, 0): npy_format.read_array_header_1_0,
                           (2, 0): npy_format.read_array_header_2_0}.get(version)
            header = None if read_header is None else read_header(fp)
            header_bytes = fp.tell()
    except UNREADABLE as exc:
        fail(f"{unreadable} ({exc}; truncated or corrupt)")
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError or tokenize.TokenError
        fail(f"array '{name}' has no valid .npy header ({type(exc).__name__}: {exc})")
    if header is None:
        fail(f"array '{name}' has .npy format version {version}, which holds structured data; {HOW_TO_SAVE}")
    shape, _, dtype = header
    if dtype.hasobject or dtype.fields is not None:
        fail(f"array '{name}' holds {'Python objects' if dtype.hasobject else 'structured records'} ({dtype}); "
             f"only plain numeric arrays are read")
    declared = math.prod(shape) * dtype.itemsize
    stored = info.file_size - header_bytes
    if declared != stored:
        fail(f"array '{name}': its header declares {dtype} {list(shape)} = {declared:,} bytes, but the file holds "
             f"{stored:,} bytes for it (truncated or corrupt)")
    memory = _memory_bytes()
    if memory is not None and declared > memory:
        fail(f"array '{name}' is {declared:,} bytes, more than this machine's {memory:,} bytes of memory")
    return shape, dtype


def _check_shapes(headers: dict, fail, label: str = "'features'") -> None:
    if "features" not in headers:
        fail(f"no array 'features' (found {sorted(headers) or 'no arrays'}); accepted: {ACCEPTED_TEXT}")
    shape, dtype = headers["features"]
    if len(shape) != 3 or min(shape) < 1 or dtype.kind != "f":
        fail(f"{label} must be a float array [B, N, D] with B, N, D >= 1, got {dtype} {list(shape)}")
    if dtype.itemsize not in FEATURE_ITEMSIZES:
        fail(f"{label} is {dtype.name} ({dtype.itemsize} bytes per value), which torch cannot hold; "
             f"convert it to float16, float32 or float64")
    b, n, _ = shape
    if "importance" in headers:
        w_shape, w_dtype = headers["importance"]
        if tuple(w_shape) != (b, n) or w_dtype.kind not in "fiu" or w_dtype.itemsize > 8:
            fail(f"'importance' must be a numeric array [B, N] = [{b}, {n}] (at most 64-bit), "
                 f"got {w_dtype} {list(w_shape)}")
    if "lengths" in headers:
        l_shape, l_dtype = headers["lengths"]
        if tuple(l_shape) != (b,) or l_dtype.kind not in "iu":
            fail(f"'lengths' must be an integer array [B] = [{b}], got {l_dtype} {list(l_shape)}")


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, fail) -> np.ndarray:
    try:
        with zf.open(info) as fp:
            array = npy_format.read_array(fp, allow_pickle=False)
            fp.read()   # reach the member's end, where zipfile checks its CRC
    except UNREADABLE + (ValueError,) as exc:
        fail(f"array '{info.filename[:-4]}' cannot be read ({exc}; truncated or corrupt)")
    if not array.dtype.isnative:   # torch takes native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def read_token_file(path: str) -> TokenFile:
    """The arrays of a ``--data`` file, checked; raises :class:`TokenFileError`."""
    def fail(problem):
        raise TokenFileError(f"--data {path}: {problem}")

    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as exc:
        fail(f"cannot open it ({exc.strerror or exc})")
    if not magic:
        fail(f"the file is empty; expected an .npz archive with {ACCEPTED_TEXT}")
    if magic.startswith(NPY_MAGIC):
        fail(f"this is a single .npy array; --data takes an .npz archive of named arrays, {ACCEPTED_TEXT}: "
             f"{HOW_TO_SAVE}")
    if not magic.startswith(ZIP_MAGIC):
        fail(f"not an .npz archive (it does not start with the zip signature); {HOW_TO_SAVE}")
    try:
        zf = zipfile.ZipFile(path)
    except UNREADABLE + (ValueError,) as exc:
        fail(f"not a readable .npz (zip) archive ({exc}; truncated or corrupt)")
    with zf:
        members = zf.infolist()
        stray = [m.filename for m in members if not m.filename.endswith(".npy")]
        if stray:
            fail(f"archive member(s) {stray} are not .npy arrays; an .npz holds only name.npy members ({HOW_TO_SAVE})")
        by_name = {m.filename[:-4]: m for m in members}
        features_from = "features"
        if "features" not in by_name:
            if len(by_name) == 1:
                # one array, whatever its name (np.savez(path, x) calls it arr_0): it can only be the tokens
                features_from = next(iter(by_name))
                by_name = {"features": by_name[features_from]}
            else:
                found = ", ".join(f"'{name}' ({dtype} {list(shape)})" for name, (shape, dtype)
                                  in ((name, _header(zf, m, fail)) for name, m in by_name.items()))
                fail(f"no array named 'features': found {found or 'no arrays'}; --data reads the arrays "
                     f"named {ACCEPTED_TEXT}: {HOW_TO_SAVE}")
        headers = {name: _header(zf, m, fail) for name, m in by_name.items() if name in ACCEPTED}
        _check_shapes(headers, fail, "'features'" if features_from == "features" else
                      f"'{features_from}' (the file's only array, read as the features)")
        arrays = {name: _read(zf, by_name[name], fail) for name in headers}
    lengths = arrays.get("lengths")
    if lengths is not None:
        n = arrays["features"].shape[1]
        if (lengths < 0).any() or (lengths > n).any():
            fail(f"'lengths' must lie in 0 .. N = {n}, got {lengths.tolist()}")
        lengths = lengths.astype(np.int64)
    return TokenFile(arrays["features"], arrays.get("importance"), lengths,
                     sorted(name for name in by_name if name not in ACCEPTED), features_from)
