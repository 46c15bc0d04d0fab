"""The matmul both sides of the model use: y = x @ W.T on weights prepared once at load.

Shapes: N output features, Kin input features.

It lives in `mixtral`, below both services, so the attention math and the expert math
share it without importing each other.
"""

import torch
import torch.nn.functional as F


def _onednn_ok(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linear(w: torch.Tensor) -> torch.Tensor:
    """w [N, Kin] -> the weight `linear` takes.

    torch sends fp32 CPU matmuls to MKL, which runs well below oneDNN on the same shapes on
    the AMD EPYC we benchmark on (docs/benchmarks.md, engine against HF). oneDNN wants the
    weight reordered into its blocked layout, done once here, so the dense copy can be
    dropped. Still fp32 throughout, only the order of the sums changes. Anything else is
    returned as is: bf16 already goes to oneDNN inside torch, and GPUs have their own BLAS.
    """
    if not _onednn_ok(w):
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous())


# oneDNN builds a kernel for each new row count (about a millisecond), and a step
# of prompt chunks brings row counts never seen before to every matmul (the step's tokens,
# each expert's share). Row counts from _PAD_FROM up are rounded up to a multiple of
# _PAD_TO, so a few dozen kernels serve them all, at the price of at most _PAD_TO - 1
# padding rows (at most 12% more rows). Smaller counts (decode steps) repeat step after
# step and are left as they are.
_PAD_FROM, _PAD_TO = 128, 16


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., Kin], w from pack_linear -> x @ W.T [..., N]."""
    if w.is_mkldnn:
        M = x.shape[0]
        pad = -M % _PAD_TO if x.dim() == 2 and M >= _PAD_FROM else 0
        y = torch.ops.mkldnn._linear_pointwise(F.pad(x, (0, 0, 0, pad)) if pad else x, w, None, "none", [], "")
        return y[:M] if pad else y
    return F.linear(x, w)
