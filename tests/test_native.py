"""The native embedding encoder's packed forward (``inference_node/native.py``): attention in
runs of rows, rows sorted by length, in float32 and in bfloat16 (whose matmuls run at bucketed
row counts, ``inference_node/row_buckets.py``), against the padded forward and one text at a
time."""

from __future__ import annotations

import itertools

import pytest
import torch

from inference_node.model_types import Embedder
from inference_node.models import load_embedder
from inference_node.native import ATTENTION_GROUPS, attention_groups
from tests.test_embed_batching import TEXTS as SENTENCES

TEXTS = SENTENCES * 3
FLOAT32_TOLERANCE = 1e-5
BF16_HIDDEN_TOLERANCE = 0.03
"""Of the largest hidden state's magnitude: a few bf16 steps (one step is 2^-8 of it)."""
BF16_VECTOR_TOLERANCE = 0.004
"""Per component of a unit vector (0.0016 at most over 40 texts, 2026-12-06)."""


@pytest.fixture(scope="module")
def minilm_bf16() -> Embedder:
    return load_embedder("all-minilm-l6-v2", dtype="bfloat16")


def test_attention_groups_split_rows_into_equal_runs() -> None:
    """Rows split into at most ATTENTION_GROUPS contiguous runs of equal count (± 1), each of
    at least four rows where there are that many, covering every row once."""
    assert attention_groups(0) == []
    assert attention_groups(2) == [(0, 2)]
    assert attention_groups(8) == [(0, 4), (4, 8)]
    runs = attention_groups(18)
    assert len(runs) == ATTENTION_GROUPS
    assert runs[0][0] == 0 and runs[-1][1] == 18
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert {end - start for start, end in runs} <= {4, 5}


def packed_against_padded_and_alone(
    embedder: Embedder, hidden: float, vector: float, *, relative: bool = False
) -> None:
    """In the given order and sorted by length, the packed forward (several attention
    groups) gives each real token the padded forward's hidden state within ``hidden``
    (of the largest magnitude when ``relative``, else absolute), and
    ``embed_each`` (which sorts) answers each text in its own place, as alone, within
    ``vector`` per component, with its own token count."""
    ids, mask = embedder.tokenize(TEXTS)
    assert len(attention_groups(len(TEXTS))) > 1
    order = torch.argsort(mask.sum(dim=1))
    for rows_ids, rows_mask in ((ids, mask), (ids[order], mask[order])):
        packed = embedder.encoder.packed(rows_ids, rows_mask).float()
        want = embedder.encoder(rows_ids, rows_mask).float()[rows_mask.bool()]
        scale = want.abs().max().item() if relative else 1.0
        assert (packed - want).abs().max().item() <= hidden * scale
    vectors, tokens = embedder.embed_each(TEXTS)
    for text, got, count in zip(TEXTS, vectors, tokens, strict=True):
        own, (own_count,) = embedder.embed_each([text])
        assert count == own_count
        assert max(abs(x - y) for x, y in zip(got, own[0], strict=True)) <= vector


def test_packed_attention_in_groups_matches_the_padded_forward(minilm: Embedder) -> None:
    """float32: the packed, grouped, sorted forward equals the padded one and one text at a
    time within 1e-5."""
    packed_against_padded_and_alone(minilm, FLOAT32_TOLERANCE, FLOAT32_TOLERANCE)


def test_the_bf16_forward_matches_within_bf16_rounding(
    minilm_bf16: Embedder, minilm: Embedder
) -> None:
    """bfloat16, matmuls padded to their row buckets: the same checks within bf16 rounding,
    and each vector's cosine with the float32 one at least 0.999."""
    packed_against_padded_and_alone(
        minilm_bf16, BF16_HIDDEN_TOLERANCE, BF16_VECTOR_TOLERANCE, relative=True
    )
    got = torch.tensor(minilm_bf16.embed_each(TEXTS)[0])
    want = torch.tensor(minilm.embed_each(TEXTS)[0])
    assert (got * want).sum(dim=1).min().item() >= 0.999
