"""Matmuls whose row count is rounded up to a few buckets on CPU in reduced precision.

On CPU, torch runs bfloat16/float16 matmuls through oneDNN, which builds (JIT-compiles) a
kernel per shape and caches it (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, 1,024 by default). A
matmul whose row count is new pays for that build: about 5-10 ms on this machine's AMX cores,
several times the matmul itself. A packed embedding batch changes its row count (its real
tokens) on almost every forward, so its matmuls ran at a fraction of the speed of a repeated
shape (docs/decisions/node-row-buckets.md).

:func:`mm` pads the input's rows with zeros up to :func:`bucket_rows` (exact up to
:data:`EXACT_ROWS`, then eight buckets per doubling: at most 12.5 % padding) and returns the
real rows only, so every row's result is what an unpadded matmul gives it. :func:`warm`
builds the buckets ahead. float32 on CPU (MKL) and every dtype on CUDA build nothing per shape
and are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

EXACT_ROWS = 16
"""Row counts up to this stay exact; past it a bucket is at most an eighth wider."""

_BUCKETS_PER_DOUBLING_BITS = 3
"""log2 of the buckets per doubling of the row count above :data:`EXACT_ROWS`."""

_REDUCED = (torch.bfloat16, torch.float16)


def bucket_rows(rows: int) -> int:
    """The row count a matmul of ``rows`` rows runs at: ``rows`` itself up to
    :data:`EXACT_ROWS`, else rounded up to a multiple of an eighth of its power of two."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 1 - _BUCKETS_PER_DOUBLING_BITS)
    return -(-rows // step) * step


def builds_per_shape(weight: torch.Tensor) -> bool:
    """Whether a matmul with ``weight`` builds a kernel per input shape (oneDNN on CPU in
    bfloat16/float16), so that its row count is worth bucketing."""
    return weight.device.type == "cpu" and weight.dtype in _REDUCED


def mm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight_t (+ bias)`` for ``x`` ``[rows, in]`` and ``weight_t`` ``[in, out]``,
    padded to :func:`bucket_rows` rows where :func:`builds_per_shape`; returns ``[rows, out]``
    (contiguous)."""
    rows = x.shape[0]
    padded = bucket_rows(rows) if builds_per_shape(weight_t) else rows
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    out = torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    return out[:rows] if padded != rows else out


WARM_ROWS = 4096
"""Row counts up to this are built at load (:func:`warm`): past it a forward takes long enough
that one build is a small part of it."""


def warm(
    products: Iterable[tuple[torch.Tensor, torch.Tensor | None]], max_rows: int = WARM_ROWS
) -> int:
    """Build the kernel of every bucketed row count up to ``max_rows`` for each distinct
    (weight shape, with or without bias, dtype) among ``products`` (each ``(weight_t, bias)`` as
    :func:`mm` takes them), by products of zeros, where :func:`builds_per_shape`; returns the
    number of products run (0 elsewhere)."""
    kinds: dict[tuple[int, int, bool, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]]
    kinds = {}
    for w, b in products:
        if builds_per_shape(w):
            kinds.setdefault((w.shape[0], w.shape[1], b is not None, w.dtype), (w, b))
    counts = sorted({bucket_rows(r) for r in range(1, max_rows + 1)})
    with torch.inference_mode():
        for w, b in kinds.values():
            x = w.new_zeros(counts[-1], w.shape[0])  # one input, its first rows each time
            for rows in counts:
                mm(x[:rows], w, b)
    return len(kinds) * len(counts)
