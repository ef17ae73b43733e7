"""One table for tensor data types: numpy dtype, V2 protocol string, config enum name."""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError

# (numpy dtype, KServe V2 datatype, model-config DataType name, bytes per element)
_TABLE = [
    (np.dtype(np.bool_), "BOOL", "TYPE_BOOL"),
    (np.dtype(np.uint8), "UINT8", "TYPE_UINT8"),
    (np.dtype(np.uint16), "UINT16", "TYPE_UINT16"),
    (np.dtype(np.uint32), "UINT32", "TYPE_UINT32"),
    (np.dtype(np.uint64), "UINT64", "TYPE_UINT64"),
    (np.dtype(np.int8), "INT8", "TYPE_INT8"),
    (np.dtype(np.int16), "INT16", "TYPE_INT16"),
    (np.dtype(np.int32), "INT32", "TYPE_INT32"),
    (np.dtype(np.int64), "INT64", "TYPE_INT64"),
    (np.dtype(np.float16), "FP16", "TYPE_FP16"),
    (np.dtype(np.float32), "FP32", "TYPE_FP32"),
    (np.dtype(np.float64), "FP64", "TYPE_FP64"),
]
_BY_NUMPY = {d: (v2, cfg) for d, v2, cfg in _TABLE}
_BY_V2 = {v2: d for d, v2, _ in _TABLE}
_BY_CONFIG = {cfg: d for d, _, cfg in _TABLE}


def to_v2(dtype) -> str:
    """numpy dtype -> V2 datatype string ("UINT8", "FP32", ...)."""
    try:
        return _BY_NUMPY[np.dtype(dtype)][0]
    except (KeyError, TypeError):
        raise InvalidInputError(f"unsupported dtype {dtype!r}; expected one of {sorted(_BY_V2)}") from None


def from_v2(datatype: str) -> np.dtype:
    """V2 datatype string -> numpy dtype."""
    try:
        return _BY_V2[datatype]
    except KeyError:
        raise InvalidInputError(
            f"unsupported datatype {datatype!r}; expected one of {sorted(_BY_V2)}"
        ) from None


def to_config(dtype) -> str:
    """numpy dtype -> model-config enum name ("TYPE_UINT8", ...)."""
    return _BY_NUMPY[np.dtype(dtype)][1]


def from_config(name: str) -> np.dtype:
    """model-config enum name -> numpy dtype."""
    try:
        return _BY_CONFIG[name]
    except KeyError:
        raise ValueError(f"unsupported config data type {name!r}; expected one of {sorted(_BY_CONFIG)}") from None
