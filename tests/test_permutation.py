"""The keyed permutation behind every source's per-epoch shuffle (megatron_vlm/data/permutation.py)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vlm.data.permutation import KeyedPermutation, endless_order


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 31, 127, 1001, 4099, 65_537, 300_007])
def test_every_index_exactly_once_for_odd_and_awkward_sizes(n, wide):
    perm = KeyedPermutation(n, seed=11, name="src", wide=wide)
    for epoch in (0, 1, 1234):
        ids = perm(np.arange(n), epoch)
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))


def test_seeds_names_and_epochs_give_different_orders_and_the_same_inputs_the_same():
    n = 10_007
    a = KeyedPermutation(n, 0, "text")(np.arange(n), 0)
    np.testing.assert_array_equal(a, KeyedPermutation(n, 0, "text")(np.arange(n), 0))
    for other in (KeyedPermutation(n, 1, "text")(np.arange(n), 0),       # another seed
                  KeyedPermutation(n, 0, "caption")(np.arange(n), 0),    # another source
                  KeyedPermutation(n, 0, "text")(np.arange(n), 1)):      # another epoch
        assert (a != other).mean() > 0.99
    assert (a != np.arange(n)).mean() > 0.99                             # shuffled at all


def test_any_slice_of_any_epoch_agrees_with_the_whole_epoch():
    n = 4_097
    perm = KeyedPermutation(n, 3, "x")
    whole = [perm(np.arange(n), e) for e in range(3)]
    rng = np.random.default_rng(0)
    j = rng.integers(0, 3 * n, 500)
    np.testing.assert_array_equal(endless_order(perm, j),
                                  np.array([whole[k // n][k % n] for k in j]))
    np.testing.assert_array_equal(perm(np.array([17, 5]), np.array([2, 0])),
                                  [whole[2][17], whole[0][5]])


def test_the_first_position_is_close_to_uniform_over_epochs():
    perm = KeyedPermutation(13, 5, "tiny")
    first = perm(np.zeros(13_000, dtype=np.int64), np.arange(13_000))
    counts = np.bincount(first, minlength=13)
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 45, counts     # 12 degrees of freedom: p < 1e-5 beyond 45
