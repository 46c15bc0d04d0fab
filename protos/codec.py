"""Tensor codec: the one place torch tensors become wire bytes and back.

A tensor travels as `Tensor{data, dtype, shape}`: its elements in C order, little-endian,
with no header of their own. Two ways to use it:

- Message path: `encode(t, msg)` / `decode(msg)` fill and read `Tensor` messages. Simple,
  works with the generated stubs as they are, and fine for small tensors.
- Fast path for the big ones (hidden rows, expert outputs): `pack(msg, hidden=t)` returns
  the serialized message with tensors spliced in, and `unpack(ExpertBatch, data)` parses
  one, viewing tensor data in place. Both are ordinary protobuf wire format, so either
  side may use either path. To use them over gRPC, register the methods with
  `pack`ed bytes as the response (serializer None passes bytes through) and
  `functools.partial(unpack, cls)` as the request deserializer, or the mirror image on
  the client.

Host memory copies of a tensor's bytes on each side, measured with the upb protobuf
backend (protobuf 7.x), not counting gRPC's own copy between Python bytes and its
buffers, nor a device transfer:

    message path  send: encode 2 (tobytes; assigning bytes into the message's arena)
                        + SerializeToString 2 (into an arena buffer; then into bytes)
                  recv: FromString 1 (upb does not alias its input) + `msg.data` 1,
                        on every access; decode views that bytes object in place
    fast path     send: pack 1 (one join into the output bytes)
                  recv: unpack 0 (a view into the received bytes), 1 if the data is
                        misaligned for its dtype; pack aligns it, so only foreign
                        senders cause that

A non-contiguous tensor costs one more copy on the send side of either path.

Decoded tensors share memory with an immutable bytes object: treat them as read-only
(in-place ops would write into it). `.to(device)` or `.clone()` gives a writable copy.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch
from google.protobuf.message import DecodeError

from protos import expert_pb2 as pb

if sys.byteorder != "little":  # the wire is little-endian and data is sent as is
    raise ImportError("protos.codec supports little-endian hosts only")

# torch.frombuffer warns, once per process, that a buffer is read-only; ours always are,
# by design (see above). Spend that one warning here, silenced. (A module-level filter
# would not do: it vanishes if this import happens inside a catch_warnings block.)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


class CodecError(ValueError):
    """A Tensor message that does not describe a valid tensor (gRPC INVALID_ARGUMENT)."""


_TO_TORCH = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT8: torch.int8,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_BOOL: torch.bool,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_FLOAT8_E4M3: torch.float8_e4m3fn,
}
_TO_WIRE = {v: k for k, v in _TO_TORCH.items()}
# Same-width stand-ins that numpy understands (it has no bfloat16).
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TENSOR = pb.Tensor.DESCRIPTOR
_DATA = _TENSOR.fields_by_name["data"].number
_PAD = 15  # reserved in Tensor for this padding
_ALIGN = 16


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot be sent") from None


def torch_dtype(value: int) -> torch.dtype:
    if value == pb.DTYPE_UNSPECIFIED:
        raise CodecError("tensor dtype is unset")
    try:
        return _TO_TORCH[value]
    except KeyError:
        raise CodecError(f"unknown tensor dtype {value}") from None


def _host_array(t: torch.Tensor) -> np.ndarray:
    """t's elements in C order as a flat host array of same-width integers."""
    wire_dtype(t.dtype)
    # torch's own contiguous() is far faster than numpy copying a strided array, and on
    # a GPU it runs before the transfer.
    t = t.detach().contiguous().cpu()
    return t.view(_SAME_WIDTH[t.element_size()]).numpy().reshape(-1)


def encode(t: torch.Tensor, msg: pb.Tensor | None = None) -> pb.Tensor:
    """Fill msg (or a new Tensor) from t. Pass a submessage (`batch.hidden`) to fill it
    in place: building a Tensor and then CopyFrom or a constructor argument copies the
    data again."""
    msg = pb.Tensor() if msg is None else msg
    msg.dtype = wire_dtype(t.dtype)
    msg.shape[:] = t.shape
    msg.data = _host_array(t).tobytes()
    return msg


def _view(buf: bytes, offset: int, nbytes: int, dtype_value: int, shape) -> torch.Tensor:
    """Validate a tensor description and view its nbytes at buf[offset:]."""
    dtype = torch_dtype(dtype_value)
    shape = list(shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"tensor shape {shape} has a negative dimension")
    itemsize = dtype.itemsize
    need = math.prod(shape) * itemsize
    if nbytes != need:
        name = str(dtype).removeprefix("torch.")
        raise CodecError(f"tensor data is {nbytes} bytes, shape {shape} {name} needs {need}")
    if need == 0:  # frombuffer rejects empty buffers
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(buf, dtype=dtype, count=need // itemsize, offset=offset)
    if t.data_ptr() % itemsize:
        t = t.clone()
    return t.view(shape)


def decode(msg: pb.Tensor) -> torch.Tensor:
    """The tensor msg describes, viewing its data in place (read-only, see above)."""
    data = msg.data  # each access copies out of the message: read it once
    return _view(data, 0, len(data), msg.dtype, msg.shape)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(number: int) -> bytes:  # length-delimited field
    return _varint(number << 3 | 2)


def _tensor_fields(descriptor) -> dict[int, str]:
    return {f.number: f.name for f in descriptor.fields
            if f.message_type is _TENSOR and not f.is_repeated}


def pack(msg, **tensors: torch.Tensor) -> bytes:
    """Serialize msg with each keyword's tensor as that Tensor field, copying each
    tensor's bytes once. The fields must be unset in msg. Each tensor's data is placed
    at a 16-byte-aligned offset so that `unpack` can view it in place."""
    fields = {name: num for num, name in _tensor_fields(msg.DESCRIPTOR).items()}
    parts = [msg.SerializeToString()]
    pos = len(parts[0])
    for name, t in tensors.items():
        if name not in fields:
            raise ValueError(f"{msg.DESCRIPTOR.name} has no Tensor field {name!r}")
        if msg.HasField(name):
            raise ValueError(f"{name} is set in the message; pass it only to pack")
        arr = _host_array(t).view(np.uint8)
        head = pb.Tensor(dtype=wire_dtype(t.dtype), shape=t.shape).SerializeToString()
        tag = _tag(fields[name])
        data_len = _tag(_DATA) + _varint(arr.nbytes)
        # Padding is Tensor's reserved field, which parsers skip. It costs at least a
        # tag and a length byte, so try 0 and then 2, 3, ... bytes.
        for pad_len in (0, *range(2, 2 + 2 * _ALIGN)):
            pad = _tag(_PAD) + _varint(pad_len - 2) + bytes(pad_len - 2) if pad_len else b""
            body = len(head) + pad_len + len(data_len) + arr.nbytes
            start = pos + len(tag) + len(_varint(body)) + len(head) + pad_len + len(data_len)
            if start % _ALIGN == 0:
                break
        parts += [tag, _varint(body), head, pad, data_len, memoryview(arr)]
        pos = start + arr.nbytes
    return b"".join(parts)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise CodecError("malformed message: bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _scan(buf: memoryview, pos: int, end: int):
    """Yield (field number, wire type, field start, value start, field end)."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        value = pos
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            n, value = _read_varint(buf, pos, end)
            pos = value + n
        elif wire_type == 5:
            pos += 4
        else:
            raise CodecError(f"malformed message: wire type {wire_type}")
        if pos > end:
            raise CodecError("malformed message: truncated field")
        yield number, wire_type, start, value, pos


def unpack(cls, data: bytes):
    """Parse serialized `cls` bytes into (message, {field name: tensor}). Tensor fields
    are taken out of the message and viewed in place in data (read-only, see above);
    a tensor field absent from the wire is absent from the dict."""
    buf = memoryview(data)
    tensor_fields = _tensor_fields(cls.DESCRIPTOR)
    rest, found = [], {}
    for number, wire_type, start, value, end in _scan(buf, 0, len(buf)):
        if number not in tensor_fields or wire_type != 2:
            rest.append(buf[start:end])
            continue
        # A message field may repeat on the wire; its occurrences merge, so collect
        # every header part and keep the last data.
        head, span = found.setdefault(number, ([], [None]))
        for n, wt, s, v, e in _scan(buf, value, end):
            if n == _DATA and wt == 2:
                span[0] = (v, e - v)
            else:
                head.append(buf[s:e])
    try:
        msg = cls.FromString(b"".join(rest))
        headers = {n: pb.Tensor.FromString(b"".join(head)) for n, (head, _) in found.items()}
    except DecodeError as e:
        raise CodecError(f"malformed message: {e}") from None
    tensors = {}
    for number, (_, span) in found.items():
        header = headers[number]
        offset, nbytes = span[0] or (0, 0)
        name = tensor_fields[number]
        try:
            tensors[name] = _view(data, offset, nbytes, header.dtype, header.shape)
        except CodecError as e:
            raise CodecError(f"{name}: {e}") from None
    return msg, tensors
