"""Products with a layer's weights, x @ w.T (+ b), in the form the compute policy measured fastest on this CPU for
the number of rows (compute.MatmulForms).

A decode step's few rows make every product memory-bound: what matters is how fast a kernel streams the weights
once. F.linear does not always: on an Intel Xeon with AMX (torch 2.13, oneDNN), the decode matmuls of the 201M
bf16 benchmark model streamed at ~14 GB/s through F.linear, at ~19 GB/s through torch.mv (one row) or
(w @ x.T).T (2 to 64 rows), all from the same row-major weights, with the same float32 accumulation, and at ~25 GB/s
through our tile kernel (native.TileMatmul, where the CPU has AMX).
"""
import torch
import torch.nn.functional as F

from .native import tile_matmul

FORMS = ("linear", "gemv", "wxt", "tiles")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, form: str = "linear") -> torch.Tensor:
    """x @ w.T + b in x's dtype, reading w in its own (a narrow pass: compute.Compute.narrow_rows), computed as
    `form` says (compute.MatmulForms: which call is fastest for this many rows on this CPU): "linear" F.linear,
    "gemv" torch.mv (one row), "wxt" (w @ x.T).T, a tall-skinny product that streams w once (its [out, rows]
    result transposed into place: a few rows, a small copy, and the next kernels read rows contiguously), "tiles"
    our AMX kernel (bf16; where it cannot take the shapes, torch.mv or (w @ x.T).T)."""
    xw = x if x.dtype == w.dtype else x.to(w.dtype)
    if form == "tiles" and (tiles := tile_matmul()) is not None and (y := tiles(xw, w, b)) is not None:
        pass
    elif form in ("gemv", "tiles") and len(xw) == 1:
        y = (torch.mv(w, xw[0]) if b is None else torch.addmv(b, w, xw[0])).unsqueeze(0)
    elif form in ("wxt", "tiles"):
        y = (torch.mm(w, xw.t()) if b is None else torch.addmm(b[:, None], w, xw.t())).t().contiguous()
    else:
        y = F.linear(xw, w, b)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def forms_here(dtype: torch.dtype) -> tuple[str, ...]:
    """The forms that run as themselves for weights in `dtype` on this CPU: "tiles" only in bf16, where the tile
    kernel runs."""
    tiles = dtype == torch.bfloat16 and tile_matmul() is not None
    return tuple(f for f in FORMS if f != "tiles" or tiles)
