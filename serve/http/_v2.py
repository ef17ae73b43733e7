"""KServe V2 over HTTP/JSON: tensors from a request (JSON "data" or the binary tensor data extension)
and BYTES serialization for the classification extension."""

from __future__ import annotations

import json

import numpy as np

from .. import datatypes
from ..errors import InvalidInputError

HEADER_LENGTH = "Inference-Header-Content-Length"


def tensor_metadata(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}


def flag(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidInputError(f"received {what}={value!r}; expected true or false")


def input_array(request: dict, binary: memoryview, spec, name: str) -> np.ndarray:
    """The request's one input tensor as a numpy array, checked against the model's input."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else "no"
        raise InvalidInputError(
            f"model '{name}': received {count} input tensors, expected exactly 1 ('{spec.name}') in \"inputs\""
        )
    tensor = inputs[0]
    if tensor.get("name") != spec.name:
        raise InvalidInputError(f"model '{name}': received input {tensor.get('name')!r}, expected {spec.name!r}")
    datatype = tensor.get("datatype")
    dtype = datatypes.from_v2(datatype) if isinstance(datatype, str) else None
    if dtype != spec.dtype:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received datatype {datatype!r}, expected {spec.datatype!r}"
        )
    raw_shape = tensor.get("shape")
    expected = ["N", *spec.shape]
    if not isinstance(raw_shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw_shape):
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received shape {raw_shape!r}, expected a list of integers "
            f"{expected} (-1 = any)"
        )
    shape = tuple(raw_shape)
    if len(shape) != len(expected) or any(d < 0 for d in shape) or any(
            want != -1 and got != want for got, want in zip(shape[1:], spec.shape)):
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received shape {list(shape)}, expected {expected} (-1 = any)"
        )
    count = int(np.prod(shape))
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"model '{name}' input '{spec.name}': \"parameters\" must be an object")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        want = count * dtype.itemsize
        if not isinstance(size, int) or size != want:
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received binary_data_size {size!r}, "
                f"expected {want} bytes for shape {list(shape)} {datatype}"
            )
        if len(binary) != size:
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received {len(binary)} bytes of binary data after the "
                f"JSON header, expected binary_data_size={size}"
            )
        return np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    if len(binary):
        raise InvalidInputError(
            f"model '{name}': received {len(binary)} bytes of binary data but no input declares binary_data_size"
        )
    if "data" not in tensor:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received no data; expected \"data\" (a list of numbers) or "
            "parameters.binary_data_size with the binary tensor data extension"
        )
    try:
        values = np.asarray(tensor["data"])
    except ValueError:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received ragged nested \"data\"; expected a flat or "
            f"row-major nested list of {count} numbers"
        ) from None
    if values.size != count:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received {values.size} values in \"data\", "
            f"expected {count} for shape {list(shape)}"
        )
    if dtype.kind in "iu":
        if values.size and values.dtype.kind not in "iu":
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received {values.dtype.name} values in \"data\", "
                f"expected integers for {datatype}"
            )
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received values in [{values.min()}, {values.max()}], "
                f"expected {datatype} values in [{info.min}, {info.max}]"
            )
    elif values.size and values.dtype.kind not in "iufb":
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received {values.dtype.name} values, expected numbers"
        )
    return values.astype(dtype).reshape(shape)


def serialize_bytes(items: list[bytes]) -> bytes:
    """V2 BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def loads(data: bytes, what: str):
    if not data.strip():
        raise InvalidInputError(f"received an empty body; expected {what} as JSON")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"received a body that is not valid JSON ({exc}); expected {what}") from None
