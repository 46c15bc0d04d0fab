"""Wire tensors to and from a device: host tensors for the codec, device tensors for the math.

The codec reads and writes host memory; the math runs wherever its side's model is. Every
tensor that crosses the transport goes through one `DeviceCopier` on each side: the
sender's copies its rows to the host before packing, the receiver's copies what it
unpacked to its own device. So a shard's results land on the device of the hidden state
the attention side sent, and the rows land on the shard's device, whatever either is.

On CUDA both directions are non-blocking copies through pinned host memory on a copy
stream of their own, and the caller awaits them without blocking its event loop: while a
micro-batch's rows or results are in flight over PCIe, the compute stream runs the other
micro-batch's attention (ping-pong), or the shard's previous batch. Pinned buffers come
from torch's caching host allocator, which keeps them for reuse and does not hand a
buffer out again before the copies that used it are done. What a copier returns is
complete: the copy stream's work is finished and device results are recorded on the
caller's current stream, so nothing about the copy stream leaks into the caller's order.

On any other device (and on CPU, where it costs nothing) the copies are plain `.to()`.
"""

from __future__ import annotations

import asyncio

import torch


async def _finished(event: "torch.cuda.Event") -> None:
    # A copy of a few MiB takes tens to hundreds of microseconds: yield to the event loop
    # until it is done rather than sleep on a timer far coarser than that.
    while not event.query():
        await asyncio.sleep(0)


class DeviceCopier:
    """Copies between host memory and one device."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    async def to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Contiguous host copies of tensors (on this device or already on the host)."""
        if not self.cuda:
            return [t.detach().to("cpu").contiguous() for t in tensors]
        stream, out = self._stream, []
        # Everything enqueued on the producer stream so far (the rows' gather, the fp8
        # quantization) must finish before the copy reads it.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for t in tensors:
                if t.device.type == "cpu":
                    out.append(t.detach().contiguous())
                    continue
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t.detach().contiguous(), non_blocking=True)
                t.record_stream(stream)   # t's memory stays allocated until the copy has read it
                out.append(host)
            done = torch.cuda.Event()
            done.record(stream)
        await _finished(done)
        return out

    async def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Copies of host tensors on this device, ready for use on the caller's current stream."""
        if not self.cuda:
            return [t.to(self.device) for t in tensors]
        stream, out = self._stream, []
        with torch.cuda.stream(stream):
            for t in tensors:
                pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                pinned.copy_(t)               # host to host, out of the received bytes
                d = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                d.copy_(pinned, non_blocking=True)
                out.append(d)
            done = torch.cuda.Event()
            done.record(stream)
        await _finished(done)
        consumer = torch.cuda.current_stream(self.device)
        for d in out:
            # Allocated on the copy stream, used on the consumer's: without this the
            # allocator could hand d's memory to the next copy while the consumer still reads it.
            d.record_stream(consumer)
        return out
