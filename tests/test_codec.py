"""protos.codec: tensors to wire bytes and back, bit for bit."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from protos import codec
from protos import expert_pb2 as pb

SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats by bit pattern: NaN payloads and -0.0 must survive."""
    return t.view(SAME_WIDTH_INT[t.element_size()])


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a.contiguous()), bits(b.contiguous()))


def special_floats(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -2.5, math.inf, -math.inf, math.nan,
              info.max, info.min, info.tiny, info.tiny / 4, -info.tiny / 8, info.eps]
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert (t[9:12] != 0).all() and not t[9:12].isnan().any()  # real subnormals
    # A NaN with a non-default payload and sign, written bit by bit.
    width = SAME_WIDTH_INT[t.element_size()]
    nan = torch.tensor([{2: 0xFE01, 4: 0xFFC0_0123}[t.element_size()]], dtype=torch.int64)
    return torch.cat([t, nan.to(width).view(dtype)]).reshape(2, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_floats_round_trip_bitwise(dtype):
    t = special_floats(dtype)
    assert_same(codec.decode(codec.encode(t)), t)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.uint8])
def test_ints_round_trip(dtype):
    info = torch.iinfo(dtype)
    t = torch.tensor([[info.min, -1 if info.min else 1, 0], [1, 7, info.max]], dtype=dtype)
    assert_same(codec.decode(codec.encode(t)), t)


def test_bool_float64_and_scalar_round_trip():
    for t in (torch.tensor([True, False, True]), torch.randn(3, 2, dtype=torch.float64),
              torch.tensor(3.5, dtype=torch.bfloat16)):
        assert_same(codec.decode(codec.encode(t)), t)


def test_non_contiguous_input():
    t = torch.randn(6, 4).to(torch.bfloat16).t()
    assert not t.is_contiguous()
    out = codec.decode(codec.encode(t))
    assert_same(out, t)
    assert out.is_contiguous()


@pytest.mark.parametrize("shape", [(0, 4096), (0,), (3, 0, 2)])
def test_empty_tensor(shape):
    t = torch.empty(shape, dtype=torch.bfloat16)
    msg = codec.encode(t)
    assert msg.data == b"" and list(msg.shape) == list(shape)
    assert_same(codec.decode(pb.Tensor.FromString(msg.SerializeToString())), t)


def test_serialized_message_round_trip():
    hidden = torch.randn(5, 64).to(torch.bfloat16)
    ids = torch.tensor([[0, 3], [1, -1], [2, 3], [7, -1], [5, 6]], dtype=torch.int32)
    batch = pb.ExpertBatch(batch_id=2**63 + 5, layer=31, trace_context={"traceparent": "00-x"})
    codec.encode(hidden, batch.hidden)  # fills the submessage in place
    codec.encode(ids, batch.expert_ids)
    codec.encode(torch.rand(5, 2), batch.weights)
    back = pb.ExpertBatch.FromString(batch.SerializeToString())
    assert back == batch and back.batch_id == 2**63 + 5
    assert_same(codec.decode(back.hidden), hidden)
    assert_same(codec.decode(back.expert_ids), ids)


def test_encode_overwrites_a_filled_message():
    msg = codec.encode(torch.zeros(4, 4))
    codec.encode(torch.ones(2, dtype=torch.int64), msg)
    assert list(msg.shape) == [2]
    assert_same(codec.decode(msg), torch.ones(2, dtype=torch.int64))


def test_wrong_byte_length():
    msg = codec.encode(torch.zeros(4, 64, dtype=torch.bfloat16))
    msg.data = bytes(1000)
    with pytest.raises(codec.CodecError, match=r"tensor data is 1000 bytes, shape \[4, 64\] bfloat16 needs 512"):
        codec.decode(msg)


def test_bad_dtype():
    msg = codec.encode(torch.zeros(2))
    msg.dtype = 42  # open enum: unknown values survive parsing, so decode must check
    msg = pb.Tensor.FromString(msg.SerializeToString())
    with pytest.raises(codec.CodecError, match="unknown tensor dtype 42"):
        codec.decode(msg)
    msg.dtype = pb.DTYPE_UNSPECIFIED
    with pytest.raises(codec.CodecError, match="dtype is unset"):
        codec.decode(msg)


def test_negative_dim():
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-2, -4], data=bytes(32))
    with pytest.raises(codec.CodecError, match=r"shape \[-2, -4\] has a negative dimension"):
        codec.decode(msg)


def test_unsendable_dtype():
    with pytest.raises(codec.CodecError, match="complex64 cannot be sent"):
        codec.encode(torch.zeros(2, dtype=torch.complex64))


def test_codec_error_is_value_error():
    assert issubclass(codec.CodecError, ValueError)


def test_decode_does_not_warn():
    # torch warns once per process about read-only buffers; run where it has not yet.
    code = ("import torch; from protos import codec; "
            "t = codec.decode(codec.encode(torch.ones(3))); assert t.sum() == 3")
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)


# Fast path: pack / unpack.

def buffer_address(data: bytes) -> int:
    return np.frombuffer(data, dtype=np.uint8).ctypes.data


def test_pack_unpack_round_trip_in_place():
    hidden = special_floats(torch.bfloat16).repeat(3, 1)
    ids = torch.tensor([[1, -1]] * 6, dtype=torch.int32)
    weights = torch.rand(6, 2)
    data = codec.pack(pb.ExpertBatch(batch_id=9, layer=3, trace_context={"a": "b"}),
                      hidden=hidden, expert_ids=ids, weights=weights)
    msg, tensors = codec.unpack(pb.ExpertBatch, data)
    assert (msg.batch_id, msg.layer, dict(msg.trace_context)) == (9, 3, {"a": "b"})
    assert not msg.HasField("hidden")
    assert_same(tensors["hidden"], hidden)
    assert_same(tensors["expert_ids"], ids)
    assert_same(tensors["weights"], weights)
    base = buffer_address(data)
    for t in tensors.values():  # views into data, aligned there
        assert base <= t.data_ptr() < base + len(data)
        assert (t.data_ptr() - base) % 16 == 0


@pytest.mark.parametrize("batch_id", [0, 1, 200, 2**20, 2**63])
@pytest.mark.parametrize("rows", [0, 1, 3, 17, 300])
def test_pack_aligns_for_any_header(batch_id, rows):
    data = codec.pack(pb.ExpertResult(batch_id=batch_id), output=torch.ones(rows, 3))
    _, tensors = codec.unpack(pb.ExpertResult, data)
    assert_same(tensors["output"], torch.ones(rows, 3))
    if rows:
        assert (tensors["output"].data_ptr() - buffer_address(data)) % 16 == 0


def test_pack_matches_message_path():
    hidden = torch.randn(4, 8).to(torch.bfloat16).t()  # non-contiguous too
    ref = pb.ExpertResult(batch_id=7, compute_seconds=0.5, rows=3)
    packed = pb.ExpertResult.FromString(codec.pack(ref, output=hidden))
    codec.encode(hidden, ref.output)
    packed.output.DiscardUnknownFields()  # the alignment padding
    assert packed == ref


def test_unpack_foreign_serialization():
    # A sender using the message path: data lands wherever protobuf puts it.
    for rows in range(1, 9):
        batch = pb.ExpertBatch(batch_id=rows)
        codec.encode(torch.arange(rows * 3, dtype=torch.int64).reshape(rows, 3), batch.hidden)
        _, tensors = codec.unpack(pb.ExpertBatch, batch.SerializeToString())
        assert_same(tensors["hidden"], torch.arange(rows * 3, dtype=torch.int64).reshape(rows, 3))
        assert tensors["hidden"].data_ptr() % 8 == 0  # copied where misaligned


def test_unpack_merges_repeated_occurrences():
    # Protobuf merges a message field that appears twice: later scalars win.
    first = pb.ExpertBatch()
    codec.encode(torch.zeros(2, dtype=torch.int32), first.hidden)
    second = pb.ExpertBatch()
    codec.encode(torch.ones(3, dtype=torch.int32), second.hidden)
    second.hidden.ClearField("shape")
    data = first.SerializeToString() + second.SerializeToString()
    # Merged: shape [2] from the first, data (12 bytes) from the second.
    with pytest.raises(codec.CodecError, match=r"hidden: tensor data is 12 bytes, shape \[2\] int32 needs 8"):
        codec.unpack(pb.ExpertBatch, data)
    assert len(pb.ExpertBatch.FromString(data).hidden.data) == 12  # as protobuf sees it


def test_unpack_absent_tensor():
    msg, tensors = codec.unpack(pb.ExpertBatch, pb.ExpertBatch(batch_id=1).SerializeToString())
    assert msg.batch_id == 1 and tensors == {}


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_unpack_truncated(cut):
    data = codec.pack(pb.ExpertBatch(batch_id=1), hidden=torch.ones(4, 4))
    with pytest.raises(codec.CodecError, match="malformed message"):
        codec.unpack(pb.ExpertBatch, data[:-cut])


def test_pack_rejects_misuse():
    with pytest.raises(ValueError, match="no Tensor field 'layer'"):
        codec.pack(pb.ExpertBatch(), layer=torch.ones(1))
    batch = pb.ExpertBatch()
    codec.encode(torch.ones(1), batch.hidden)
    with pytest.raises(ValueError, match="hidden is set"):
        codec.pack(batch, hidden=torch.ones(1))
