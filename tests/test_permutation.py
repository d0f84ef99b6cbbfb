"""The keyed permutation behind every source's per-epoch shuffle (megatron_vlm/data/permutation.py)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vlm.data.permutation import BlockedPermutation, KeyedPermutation, endless_order


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


def blocked(n, seed=11, name="src"):
    """A blocked shuffle with blocks of 64, so that small sources have many blocks."""
    return BlockedPermutation(n, seed, name, block=64)


@pytest.mark.parametrize("n", [1, 63, 64, 1000, 4097, 5001])
def test_a_blocked_shuffle_is_a_permutation_whose_blocks_tile_each_epoch(n):
    perm = blocked(n)
    j = np.random.default_rng(n).integers(0, n, 200)
    for epoch in (0, 1, 77):
        ids = perm(np.arange(n), epoch)
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))
        # Block by block in visiting order (as the blend index reads it) is the same order.
        slots = [perm.base_ids()[perm.block_positions(epoch, s)] for s in range(perm.num_blocks)]
        np.testing.assert_array_equal(np.concatenate(slots), ids)
        np.testing.assert_array_equal(perm(j, epoch), ids[j])


def test_blocked_shuffles_differ_by_seed_and_epoch_and_every_block_has_its_own_order():
    n = 5001
    perm = blocked(n)
    a = perm(np.arange(n), 0)
    np.testing.assert_array_equal(a, blocked(n)(np.arange(n), 0))
    for other in (blocked(n, seed=12)(np.arange(n), 0), blocked(n, name="cap")(np.arange(n), 0),
                  perm(np.arange(n), 1)):
        assert (a != other).mean() > 0.9
    orders = [perm.layout(e)[0] for e in range(4)]
    assert all((orders[0] != o).mean() > 0.5 for o in orders[1:])     # blocks: a new order

    def offsets(e, slot):      # the in-block order of the block visited slot-th in epoch e
        return perm.block_positions(e, slot) - orders[e][slot] * perm.block

    full = [s for s in range(perm.num_blocks) if orders[0][s] != perm.num_blocks - 1][:10]
    assert all((offsets(0, full[0]) != offsets(0, s)).mean() > 0.5 for s in full[1:])
    # The same block in the next epoch: another order of the same members (docs/blend.md).
    later = int(np.flatnonzero(orders[1] == orders[0][full[0]])[0])
    assert (offsets(0, full[0]) != offsets(1, later)).mean() > 0.5
    np.testing.assert_array_equal(np.sort(offsets(0, full[0])), np.sort(offsets(1, later)))
