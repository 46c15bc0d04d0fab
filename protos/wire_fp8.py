"""fp8 dispatch: hidden rows as OCP FP8 E4M3 with one float32 scale per row.

Shapes: T rows, D hidden.

    scale[t] = amax(|y[t]|) / 448          (1 for an all-zero row)
    q[t]     = e4m3(y[t] / scale[t])        every row spans the whole fp8 range
    y'[t]    = float(q[t]) * scale[t]

A row costs D + 4 bytes instead of 2D in bf16 (4D in fp32). E4M3 keeps 3 mantissa bits,
so each element is within 2^-4 of its value relative to itself (half that after rounding
to nearest), plus the subnormal floor at 2^-9 * scale for elements far below the row's
largest. Quantizing per row rather than per tensor keeps one token with an outlier from
costing the others their precision. Only the request travels in fp8; results come back
in the model's dtype, so the residual stream is never rounded to fp8.
"""

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [T, D] any float dtype -> q [T, D] float8_e4m3fn, scale [T] float32, on y's device."""
    if y.shape[-1] == 0:
        return y.to(E4M3), torch.ones(y.shape[:-1], device=y.device)
    # |y| without a copy of |y|: the larger of the row's max and minus its min.
    amax = torch.maximum(y.amax(dim=-1), -y.amin(dim=-1)).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (y.float() * (1 / scale)[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)   # y itself untouched
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [T, D] float8_e4m3fn, scale [T] -> [T, D] in dtype."""
    return (q.float() * scale.float()[:, None]).to(dtype)
