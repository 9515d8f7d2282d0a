"""Row-count buckets for reduced-precision CPU matmuls (``inference_node/row_buckets.py``):
the buckets' bounds, results equal to an unpadded matmul's, and the kernels built ahead."""

from __future__ import annotations

import torch

from inference_node.row_buckets import EXACT_ROWS, bucket_rows, builds_per_shape, mm, warm


def test_buckets_are_exact_up_to_the_limit_then_at_most_an_eighth_wider() -> None:
    """Row counts up to EXACT_ROWS stay as they are; past it a bucket is never narrower
    than the rows, at most 12.5 % wider, never shrinks as rows grow, and there are eight
    per doubling."""
    assert [bucket_rows(n) for n in range(1, EXACT_ROWS + 1)] == list(range(1, EXACT_ROWS + 1))
    previous = 0
    for rows in range(1, 5000):
        bucket = bucket_rows(rows)
        assert rows <= bucket <= rows * 1.125
        assert bucket >= previous
        previous = bucket
    assert len({bucket_rows(n) for n in range(129, 257)}) == 8
    assert [bucket_rows(n) for n in (17, 65, 129, 1000)] == [18, 72, 144, 1024]


def test_only_reduced_precision_on_cpu_builds_per_shape() -> None:
    """bfloat16/float16 on CPU (oneDNN) build a kernel per shape; float32 does not."""
    assert builds_per_shape(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert builds_per_shape(torch.zeros(2, 2, dtype=torch.float16))
    assert not builds_per_shape(torch.zeros(2, 2))


def test_a_padded_matmul_gives_each_row_what_the_unpadded_one_does() -> None:
    """In bfloat16 the padded product's real rows equal the unpadded product's (within one
    bfloat16 rounding step), contiguous and of the input's row count; float32 is not padded
    and exact."""
    gen = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.bfloat16, 2e-2), (torch.float32, 0.0)):
        w = torch.randn(48, 40, generator=gen).to(dtype)
        b = torch.randn(40, generator=gen).to(dtype)
        for rows in (3, 17, 65, 130):
            x = torch.randn(rows, 48, generator=gen).to(dtype)
            for bias in (None, b):
                got = mm(x, w, bias)
                want = x @ w if bias is None else torch.addmm(bias, x, w)
                assert got.shape == (rows, 40) and got.is_contiguous()
                scale = want.float().abs().max().item()
                assert (got.float() - want.float()).abs().max().item() <= tolerance * scale


def test_warm_builds_each_shape_and_bias_once_per_bucket_in_reduced_precision_only() -> None:
    """``warm`` runs one product per bucket up to ``max_rows`` for each distinct (shape,
    bias or not): weights of one shape and bias share their builds; float32 runs none."""
    w = torch.zeros(8, 4, dtype=torch.bfloat16)
    b = torch.zeros(4, dtype=torch.bfloat16)
    buckets = len({bucket_rows(n) for n in range(1, 41)})
    assert warm([(w, b), (w.clone(), b), (w, None)], max_rows=40) == 2 * buckets
    assert warm([(torch.zeros(8, 4), None)], max_rows=40) == 0
