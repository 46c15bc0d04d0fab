"""Grouped matmuls over experts' rows, with no number read back to the host: bf16/fp32 and fp8.

Shapes: M rows laid out expert after expert (each expert's rows padded to ALIGN), Kin input
features, N output features, n experts, w [n, N, Kin] (the checkpoint's [out, in] per expert).

    out[rows of e] = x[rows of e] @ w[e].T        for every expert e, in one call

`offs` [n] (int32, on the device) are the cumulative ends of the experts' row ranges, so the
call needs no row count on the host: that is what lets a layer run without a host sync and
be captured in a CUDA graph. Three ways to run it, chosen once per shard (`GroupedMM.probe`):
- `torch._grouped_mm` (one kernel for all experts; Hopper and newer CUDA, CPU on recent torch);
- for fp8 weights (e4m3, one scale per output channel), `torch._scaled_grouped_mm` on Hopper,
  the rows quantised to fp8 per row on the fly; elsewhere the weights are dequantised
  (w * scale) and the bf16/fp32 grouped call runs: the same numbers, at bf16's speed;
- a loop over experts where neither exists (it reads offs back: one host sync).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ALIGN = 16                  # rows per expert are padded to this: fp8 grouped kernels want 16-row groups
FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0            # the largest finite e4m3fn value


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, Kin] -> (e4m3 weights [..., N, Kin], fp32 scales [..., N]) with w ~= q * scale,
    one scale per output channel (row): each channel uses fp8's whole range."""
    wf = w.float()
    scale = wf.abs().amax(-1).clamp(min=1e-12) / _FP8_MAX
    return (wf / scale[..., None]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8), scale


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, Kin] -> e4m3 [M, Kin] and one fp32 scale per row (dynamic, on the device)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-12) / _FP8_MAX
    return (xf / scale[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


class GroupedMM:
    """x [M, Kin] @ w[e].T per expert range, for one shard's weights: dtype, device and way fixed."""

    def __init__(self, dtype: torch.dtype, device: torch.device, mode: str):
        self.dtype, self.device, self.mode = dtype, device, mode   # mode: scaled | grouped | loop

    @classmethod
    def probe(cls, dtype: torch.dtype, device: torch.device | str, fp8: bool, prefer: str = "auto") -> "GroupedMM":
        """The fastest way that runs here and agrees with the loop on a small problem.

        prefer: "auto"; "loop" forces the reference loop; "grouped" skips the fp8 kernel.
        A kernel that raises or disagrees is logged and passed over, never used."""
        device = torch.device(device)
        if prefer == "loop" or device.type == "meta":
            return cls(dtype, device, "loop" if prefer == "loop" else "grouped")
        modes = (["scaled"] if fp8 and device.type == "cuda" and prefer == "auto" else []) + ["grouped"]
        g = torch.Generator().manual_seed(0)
        n, N, Kin = 3, 64, 64
        x = torch.randn(5 * ALIGN, Kin, generator=g).to(device, dtype)
        w = torch.randn(n, N, Kin, generator=g).to(device)
        w, scale = quantize_fp8(w) if fp8 else (w.to(dtype), None)
        offs = torch.tensor([ALIGN, ALIGN, 5 * ALIGN], dtype=torch.int32, device=device)   # one empty expert
        ref = cls(dtype, device, "loop")(x, w, scale, offs).float()
        for mode in modes:
            try:
                got = cls(dtype, device, mode)(x, w, scale, offs).float()
                err = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
                if err < (0.08 if mode == "scaled" else 0.02):
                    log.info("expert matmuls: %s (%s%s on %s)", mode, "fp8 weights, " if fp8 else "", dtype, device)
                    return cls(dtype, device, mode)
                log.warning("expert matmuls: %s disagrees with the loop (relative error %.3g); not used", mode, err)
            except (RuntimeError, NotImplementedError, TypeError, AttributeError) as e:
                log.info("expert matmuls: %s unavailable on %s: %s", mode, device, str(e).splitlines()[0])
        log.info("expert matmuls: one per expert (%s on %s)", dtype, device)
        return cls(dtype, device, "loop")

    def __call__(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                 offs: torch.Tensor) -> torch.Tensor:
        """x [M, Kin]; w [n, N, Kin] (fp8 when scale [n, N] is given); offs [n] -> [M, N].
        Rows past offs[-1] are left undefined."""
        if self.mode == "scaled":
            xq, xs = _quantize_rows(x)
            return torch._scaled_grouped_mm(xq, w.transpose(-2, -1), xs, scale, offs=offs, out_dtype=self.dtype,
                                            use_fast_accum=True)
        if scale is not None:
            w = dequantize(w, scale, self.dtype)
        if self.mode == "grouped":
            return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        out = x.new_zeros(x.shape[0], w.shape[1])
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = x[start:end] @ w[e].T
            start = end
        return out
