"""Conversion between numpy arrays and the contract's ``Tensor`` message.

Vectors and Jacobians travel as raw little-endian, row-major bytes plus a shape, instead of ``repeated double``, so
that an (n, d, d) Jacobian costs one copy on each side rather than n*d*d per-element field operations.
Both directions live here, in the package both sides import, so that they agree on the encoding by construction.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from linlens.v1 import linlens_pb2 as pb

FloatArray = npt.NDArray[np.floating]

#: Explicit little-endian dtypes: the wire format does not depend on the host's byte order.
_DTYPES: dict[int, np.dtype[np.floating]] = {
    pb.TENSOR_DTYPE_FLOAT32: np.dtype("<f4"),
    pb.TENSOR_DTYPE_FLOAT64: np.dtype("<f8"),
}


class TensorDecodeError(ValueError):
    """A Tensor message that cannot describe an array: unknown dtype, negative dimension or wrong byte count."""


def array_from_tensor(tensor: pb.Tensor) -> FloatArray:
    """Decode a Tensor into a read-only numpy array of its own precision (float32 or float64, native byte order).

    The array is a copy when the host is big-endian and a zero-copy view of the message's bytes otherwise; it is
    marked read-only either way so that frozen result dataclasses stay frozen in spirit.
    """
    wire_dtype = _DTYPES.get(tensor.dtype)
    if wire_dtype is None:
        raise TensorDecodeError(f"unsupported tensor dtype {tensor.dtype}")
    shape = tuple(int(n) for n in tensor.shape)
    if any(n < 0 for n in shape):
        raise TensorDecodeError(f"negative dimension in tensor shape {shape}")
    count = math.prod(shape)
    expected = count * wire_dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorDecodeError(
            f"tensor of shape {shape} and dtype {wire_dtype.name} needs {expected} bytes, got {len(tensor.data)}"
        )
    array: FloatArray = np.frombuffer(tensor.data, dtype=wire_dtype, count=count).reshape(shape)
    native = array.astype(wire_dtype.newbyteorder("="), copy=False)
    native.flags.writeable = False
    return native


def tensor_from_array(array: npt.ArrayLike, dtype: str | None = None) -> pb.Tensor:
    """Encode an array as a Tensor message.

    ``dtype`` forces "float32" or "float64"; by default float64 arrays stay float64 and everything else (float16,
    bfloat16 converted by the caller, integers) is sent as float32.
    """
    values = np.asarray(array)
    if dtype is None:
        dtype = "float64" if values.dtype == np.float64 else "float32"
    wire: np.dtype[np.floating]
    if dtype == "float32":
        wire, code = np.dtype("<f4"), pb.TENSOR_DTYPE_FLOAT32
    elif dtype == "float64":
        wire, code = np.dtype("<f8"), pb.TENSOR_DTYPE_FLOAT64
    else:
        raise ValueError(f"tensor dtype must be 'float32' or 'float64', not {dtype!r}")
    encoded = np.asarray(values, dtype=wire, order="C")  # not ascontiguousarray: it turns scalars into (1,)
    return pb.Tensor(shape=list(encoded.shape), dtype=code, data=encoded.tobytes(order="C"))
