"""TokenCache scheduling: Eq. 12 (block update fractions), per-row top-k, Eq. 13 (I-steps), hand-computed."""

from __future__ import annotations

import math

import pytest
import torch

from ditcache.policies.tokencache_schedule import block_keep_counts, istep_schedule, top_tokens, uniform_keep_counts


def test_eq12_global_quantisation_gives_block_fractions():
    # 2 rows, 4 tokens, 3 blocks; ratio 0.75 keeps the top 6 of 24 values.
    scores = torch.zeros(2, 4, 3)
    scores[0, :, 0] = torch.tensor([0.9, 0.8, 0.1, 0.1])  # block 0: 2 of row 0 ...
    scores[1, :, 0] = torch.tensor([0.95, 0.1, 0.1, 0.1])  # ... and 1 of row 1 -> 3 / 8
    scores[0, :, 2] = torch.tensor([0.7, 0.6, 0.5, 0.1])  # block 2: 3 of row 0 -> 3 / 8
    counts, fractions = block_keep_counts(scores, 0.75)
    assert fractions == [3 / 8, 0.0, 3 / 8]
    assert counts == [2, 0, 2]  # round(3 / 8 x 4) = round(1.5) = 2 tokens per row (shared by the rows)


def test_eq12_extremes_and_rounding():
    scores = torch.rand(3, 10, 4, generator=torch.Generator().manual_seed(0))
    assert block_keep_counts(scores, 0.0) == ([10] * 4, [1.0] * 4)
    assert block_keep_counts(scores, 1.0) == ([0] * 4, [0.0] * 4)
    counts, fractions = block_keep_counts(scores, 0.9)
    assert sum(round(f * 30) for f in fractions) == 12  # 10% of 3 x 10 x 4 entries
    assert all(0 <= k <= 10 for k in counts)
    with pytest.raises(ValueError, match="rows, tokens, blocks"):
        block_keep_counts(torch.rand(4, 3), 0.5)


def test_uniform_counts_and_top_tokens_per_row():
    assert uniform_keep_counts(10, 3, 0.9) == [1, 1, 1]
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.1]])
    assert top_tokens(scores, 2).tolist() == [[1, 3], [0, 2]]  # each row its own tokens, ascending
    assert top_tokens(scores, 0).shape == (2, 0)
    assert top_tokens(torch.zeros(1, 4), 2).tolist() == [[0, 1]]  # ties: by position
    with pytest.raises(ValueError, match="k must be"):
        top_tokens(scores, 5)


def test_eq13_cumulative_percentiles_hand_computed():
    # weights exp(beta * a) with beta = ln 3: a = [0, 0, 1, 1, 0, 0] -> w = [1, 1, 3, 3, 1, 1], total 10;
    # cumulative weight before each step: 0, .1, .2, .5, .8, .9; percentiles 0, .5 -> steps 0, 3.
    scores = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert istep_schedule(scores, 2, beta=math.log(3)) == [0, 3]
    # 3 I-steps: percentiles 0, 1/3, 2/3 -> first steps with cumulative >= them: 0, 3 (0.5), 4 (0.8)
    assert istep_schedule(scores, 3, beta=math.log(3)) == [0, 3, 4]
    # negative beta (the paper's sign for DiT): the low-score steps weigh more; w = [3, 3, 1, 1, 3, 3] / 14
    assert istep_schedule(scores, 3, beta=-math.log(3)) == [0, 2, 5]


def test_eq13_first_step_always_and_uniform_ablation():
    scores = [0.2 + 0.01 * s for s in range(50)]
    for beta in (-50.0, 0.0, 50.0):
        steps = istep_schedule(scores, 10, beta)
        assert steps[0] == 0 and len(steps) == 10 and steps == sorted(set(steps))
    assert istep_schedule(scores, 10, 0.0) == istep_schedule(scores, 10, mode="uniform")
    assert istep_schedule(scores, 5, mode="uniform") == [0, 10, 20, 30, 40]
    assert istep_schedule([0.0] * 4, 10) == [0, 1, 2, 3]  # more I-steps than steps: every step
    with pytest.raises(ValueError, match="mode"):
        istep_schedule(scores, 3, mode="reverse")


def test_eq13_crowded_percentiles_stay_distinct():
    # all weight on the last step: every percentile lands there; repeats move to free steps
    assert istep_schedule([0.0, 0.0, 0.0, 0.0, 10.0], 3, beta=10.0) == [0, 3, 4]
