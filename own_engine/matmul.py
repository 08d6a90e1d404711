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
    tiles = tile_matmul() if form == "tiles" else None
    y = tiles(xw, w, b) if tiles is not None else None  # None too where the kernel does not take the shapes
    if y is None:
        y = _torch_product(xw, w, b, form)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _torch_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, form: str) -> torch.Tensor:
    if form in ("gemv", "tiles") and len(x) == 1:
        return (torch.mv(w, x[0]) if b is None else torch.addmv(b, w, x[0])).unsqueeze(0)
    if form in ("wxt", "tiles"):
        return (torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())).t().contiguous()
    return F.linear(x, w, b)


def forms_here(dtype: torch.dtype) -> tuple[str, ...]:
    """The forms that run as themselves for weights in `dtype` on this CPU: "tiles" only in bf16, where the tile
    kernel runs."""
    tiles = dtype == torch.bfloat16 and tile_matmul() is not None
    return tuple(f for f in FORMS if f != "tiles" or tiles)
