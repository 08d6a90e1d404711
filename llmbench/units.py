"""Byte sizes as people write and read them: the one parser and formatter for the engine and the harness.

It imports nothing heavy, so the harness reads scenario sizes through it without loading torch.
"""
import math
import re

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", re.IGNORECASE)


def parse_size(size: int | str | None) -> int | None:
    """Bytes from an int or a string: '512' or '512B' bytes; K, M, G, T (with or without B) powers of 1000;
    Ki, Mi, Gi, Ti (with or without B) powers of 1024. So '8GiB' is 8589934592 and '8G' or '8GB' is 8000000000.
    Raises ValueError naming the examples."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool)):
        return size
    m = _SIZE.fullmatch(str(size))
    if not m or (m[3] and not m[2]):
        raise ValueError(f"expected a size like 8GiB, 500MB or 1073741824, got {str(size)[:40]!r}")
    value = float(m[1]) * (1024 if m[3] else 1000) ** " KMGT".index((m[2] or " ").upper())
    if not math.isfinite(value) or value >= 2**63:
        raise ValueError(f"size {str(size)[:40]!r} is too large (at most 8 EiB)")
    return int(value)


def fmt_bytes(n: float | None) -> str:
    """'1.50 GiB', '512 B'; 'n/a' for None."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
