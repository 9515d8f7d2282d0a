"""Many LoRA adapters in one batch: each row of a projection's input uses its own adapter, or
none, and the deltas of all rows come from one gather and two batched matmuls.

This is Punica's BGMV (batched gather matrix-vector) in plain torch: for one target module of
one layer, the adapters resident on the node are stacked as ``A [n, r, in]`` and
``B [n, out, r]`` (ranks zero-padded to the largest, which adds exactly nothing); row ``i``
with adapter ``j = index[i]`` gets ``scaling[j] * B[j] @ (A[j] @ x[i])``, and rows with
``index[i] = -1`` get zeros (the base model alone). Gathering ``A[index]``, ``B[index]``
copies ``rows × r × (in + out)`` elements, so rows are processed in chunks that bound that
copy (:data:`GATHER_BYTES`); a CUDA kernel (Punica's, S-LoRA's) would read the stacks in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inference_node.lora.weights import LoraAdapter

GATHER_BYTES = 64 * 1024**2
"""Most bytes of gathered ``A``/``B`` rows held at once by :func:`lora_delta`."""


@dataclass(frozen=True)
class StackedLora:
    """One target module's factors of ``n`` adapters, stacked for :func:`lora_delta`."""

    a: torch.Tensor
    """``[n, rank, in_features]``; rows past an adapter's own rank are zero."""
    b: torch.Tensor
    """``[n, out_features, rank]``; columns past an adapter's own rank are zero."""
    scaling: torch.Tensor
    """``[n]``, each adapter's ``alpha / rank``, in the factors' dtype."""

    @classmethod
    def from_adapters(
        cls,
        adapters: Sequence[LoraAdapter],
        path: str,
        shape: tuple[int, int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> StackedLora:
        """Stack module ``path`` (``(out, in)`` = ``shape``) of ``adapters``, in order:
        index ``j`` of :func:`lora_delta` is ``adapters[j]``. An adapter that does not target
        ``path`` gets zero factors (its rows get the base output alone)."""
        out_features, in_features = shape
        rank = max((ad.config.rank for ad in adapters if ad.pair(path) is not None), default=1)
        a = torch.zeros(len(adapters), rank, in_features, dtype=dtype, device=device)
        b = torch.zeros(len(adapters), out_features, rank, dtype=dtype, device=device)
        scaling = torch.zeros(len(adapters), dtype=dtype, device=device)
        with torch.no_grad():
            for j, adapter in enumerate(adapters):
                pair = adapter.pair(path)
                if pair is None:
                    continue
                r = adapter.config.rank
                a[j, :r].copy_(pair.a)
                b[j, :, :r].copy_(pair.b)
                scaling[j] = adapter.config.scaling
        return cls(a=a, b=b, scaling=scaling)

    def nbytes(self) -> int:
        """Bytes held by the stacks."""
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.scaling))


def lora_delta(x: torch.Tensor, index: torch.Tensor, stacked: StackedLora) -> torch.Tensor:
    """The LoRA deltas ``[rows, out]`` to add to a projection's base output for input ``x``
    ``[rows, in]``; ``index`` ``[rows]`` (long) picks each row's adapter, -1 for none.

    Computed in the stacks' dtype and returned in ``x``'s. Rows with index -1 are zeros.
    """
    rows = x.shape[0]
    out = torch.zeros(rows, stacked.b.shape[1], dtype=x.dtype, device=x.device)
    adapted = (index >= 0).nonzero().squeeze(1)
    if adapted.numel() == 0:
        return out
    rank, in_features = stacked.a.shape[1:]
    per_row = rank * (in_features + stacked.b.shape[1]) * stacked.a.element_size()
    step = max(1, GATHER_BYTES // per_row)
    for start in range(0, adapted.numel(), step):
        which = adapted[start : start + step]
        chosen = index[which]
        xs = x[which].to(stacked.a.dtype).unsqueeze(2)  # [n, in, 1]
        inner = torch.bmm(stacked.a[chosen], xs)  # [n, r, 1]
        delta = torch.bmm(stacked.b[chosen], inner).squeeze(2)  # [n, out]
        delta = delta * stacked.scaling[chosen].unsqueeze(1)
        out[which] = delta.to(x.dtype)
    return out
