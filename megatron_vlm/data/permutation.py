"""Keyed pseudorandom permutations of ``range(n)``, computed on demand.

The blend index shuffles every source afresh in every epoch. Materialising those permutations
costs memory and time proportional to the source times the number of epochs drawn (2.1 billion
sequences for a 4.3T-token text run); a keyed permutation instead maps one position to one
sequence id in constant time, so any slice of any epoch costs only its own length.

Construction: a Feistel network over ``b = bit_length(n - 1)`` bits, split into a left half of
``b // 2`` bits and a right half of the rest; each of the 2 * ROUNDS half-rounds xors one half
with a keyed hash of the other, which is a bijection on ``range(2**b)`` whatever the hash is.
The hash is multiply-add-shift (the high bits of ``v * m + c`` for a random odd ``m``, computed
in arithmetic twice as wide as ``v``), a universal family that costs three array operations.
``2**b < 2n``, and positions that land outside ``range(n)`` are sent through the network again
("cycle walking") until they land inside: the orbit of a position under a bijection returns to
``range(n)``, so the result is a bijection on ``range(n)`` (fewer than two passes on average).
A domain of exactly ``n`` (mixed radix, halves added modulo their radix) would avoid the walk
but costs integer divisions, five times slower on whole epochs here. The round keys come from
sha512(seed, source name) mixed with the epoch, so every (seed, source, epoch) gets its own
permutation and one source's order does not depend on the others.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Union

import numpy as np

ROUNDS = 4
"""Feistel rounds, each two half-rounds."""

_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1

Epochs = Union[int, np.ndarray]


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 values (a bijective avalanche hash)."""
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _lowbias32(z: np.ndarray) -> np.ndarray:
    """A 32-bit avalanche hash (in place on a fresh uint32 array)."""
    z ^= z >> np.uint32(16)
    z *= np.uint32(0x7FEB352D)
    z ^= z >> np.uint32(15)
    z *= np.uint32(0x846CA68B)
    z ^= z >> np.uint32(16)
    return z


class KeyedPermutation:
    """``perm(positions, epoch)``: the sequence ids at ``positions`` of epoch ``epoch``'s
    permutation of ``range(n)``; ``epoch`` is an int or an integer array shaped like
    ``positions``."""

    def __init__(self, n: int, seed: int, name: str, *, wide: bool = False):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        self.bits = max(1, (self.n - 1).bit_length())
        self.left_bits = self.bits // 2
        self.right_bits = self.bits - self.left_bits
        # Halves of up to 16 bits hash in uint32, wider ones in uint64; ``wide`` forces uint64
        # on a small domain so that tests reach that path.
        self.wide = wide or self.right_bits > 16
        self.dtype = np.dtype(np.uint64) if self.wide else np.dtype(np.uint32)
        digest = hashlib.sha512(f"{int(seed)}\0{name}".encode("utf-8")).digest()
        base = np.frombuffer(digest, dtype="<u8").astype(np.uint64)
        self._base = np.concatenate([base, _splitmix64(base + np.uint64(_GOLDEN))])
        self._keys: dict[int, np.ndarray] = {}

    def round_keys(self, epochs: np.ndarray) -> np.ndarray:
        """Per half-round (multiplier, addend) of the given epochs: [4 * ROUNDS, len(epochs)]."""
        e = np.asarray(epochs, dtype=np.uint64).reshape(1, -1)
        keys = _splitmix64(self._base[:, None] ^ _splitmix64(e * np.uint64(_GOLDEN)))
        keys[0::2] |= np.uint64(1)                                  # odd multipliers
        return keys if self.wide else (keys >> np.uint64(32)).astype(np.uint32)

    def _epoch_keys(self, epoch: int) -> np.ndarray:
        keys = self._keys.get(epoch)
        if keys is None:
            if len(self._keys) >= 64:
                self._keys.clear()
            keys = self._keys[epoch] = self.round_keys(np.array([epoch]))
        return keys

    def _encrypt(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One pass of the network over ``range(2**bits)``; ``keys`` [4R, 1 or len(x)]."""
        dt = self.dtype.type
        width = 8 * self.dtype.itemsize
        r_bits = dt(self.right_bits)
        shifts = (dt(width - self.right_bits), dt(width - self.left_bits))
        halves = [x & dt((1 << self.right_bits) - 1), x >> r_bits]     # right, left
        tmp = np.empty_like(x)
        for k in range(2 * ROUNDS):
            if k % 2 and not self.left_bits:
                continue                       # a one-bit domain has no left half
            np.multiply(halves[(k + 1) % 2], keys[2 * k], out=tmp)
            tmp += keys[2 * k + 1]
            tmp >>= shifts[k % 2]
            halves[k % 2] ^= tmp
        halves[1] <<= r_bits
        halves[1] |= halves[0]
        return halves[1]

    def __call__(self, positions: np.ndarray, epoch: Epochs) -> np.ndarray:
        pos = np.asarray(positions)
        if self.n == 1:
            return np.zeros(pos.shape, dtype=np.int64)
        x = pos.astype(self.dtype).reshape(-1)
        per_element = False
        if np.ndim(epoch) == 0:
            keys = self._epoch_keys(int(epoch))                     # [4R, 1]: broadcast
        else:
            epochs = np.asarray(epoch).astype(np.int64, copy=False).reshape(-1)
            first = int(epochs[0]) if epochs.shape[0] else 0
            if (epochs == first).all():
                keys = self._epoch_keys(first)
            else:
                uniq, inverse = np.unique(epochs, return_inverse=True)
                keys = self.round_keys(uniq)[:, inverse]
                per_element = True
        y = self._encrypt(x, keys)
        walk = np.flatnonzero(y >= self.n)
        while walk.shape[0]:
            y[walk] = self._encrypt(y[walk], keys[:, walk] if per_element else keys)
            walk = walk[y[walk] >= self.n]
        return y.astype(np.int64).reshape(pos.shape)


def endless_order(perm: KeyedPermutation, j: np.ndarray) -> np.ndarray:
    """Sample ids at positions ``j`` of a source's endless order: epoch ``j // n`` of ``perm``,
    position ``j % n`` in it."""
    j = np.asarray(j, dtype=np.int64)
    return perm(j % perm.n, j // perm.n)


BLOCK = 4096
"""Sequences per block of a :class:`BlockedPermutation` (read when one is made)."""


class BlockedPermutation:
    """A two-level shuffle of ``range(n)`` whose every epoch has cheap prefix sums.

    A fixed keyed permutation ``base`` (the same in every epoch) is cut into blocks of ``block``
    consecutive positions (the last one may be shorter). Epoch ``e`` visits the blocks in the
    order of its own keyed permutation of the blocks, and inside each block the members in the
    order of a keyed permutation of (epoch, block). A block's members are thus a fixed random
    subset of the source; which blocks are neighbours and the order inside them change every
    epoch. The point: tokens before any position of an epoch are a sum over ``n / block`` block
    totals plus one block's partial sum, so a lookup anywhere costs O(n / block + block) instead
    of O(n) (docs/blend.md, "Variable-length sources")."""

    def __init__(self, n: int, seed: int, name: str, block: int = 0):
        self.n = int(n)
        self.block = int(block or BLOCK)
        self.num_blocks = -(-self.n // self.block)
        self.last_size = self.n - (self.num_blocks - 1) * self.block
        self.base = KeyedPermutation(self.n, seed, f"{name}\0blocked base")
        self.blocks = KeyedPermutation(self.num_blocks, seed, f"{name}\0block order")
        self.inner = KeyedPermutation(self.block, seed, f"{name}\0in block")
        self.inner_last = KeyedPermutation(self.last_size, seed, f"{name}\0in last block")
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._base_ids: Optional[np.ndarray] = None

    def base_ids(self) -> np.ndarray:
        """The base permutation as an array (made once, n int32s): it is the same in every
        epoch, and a gather costs far less than the network's cycle walk on a few positions."""
        if self._base_ids is None:
            ids = self.base(np.arange(self.n, dtype=np.int64), 0)
            self._base_ids = ids.astype(np.int32 if self.n <= 2**31 else np.int64)
        return self._base_ids

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s blocks in visiting order, and the epoch position each starts at
        (``num_blocks + 1`` entries, the last ``n``)."""
        got = self._layouts.get(epoch)
        if got is None:
            order = self.blocks(np.arange(self.num_blocks, dtype=np.int64), epoch)
            starts = np.zeros(self.num_blocks + 1, dtype=np.int64)
            np.cumsum(np.where(order == self.num_blocks - 1, self.last_size, self.block),
                      out=starts[1:])
            if len(self._layouts) >= 8:          # reads stay within an epoch or two
                self._layouts.clear()
            got = self._layouts[epoch] = (order, starts)
        return got

    def _in_block(self, blocks: np.ndarray, offsets: np.ndarray, epoch: int) -> np.ndarray:
        """Base positions of the members at ``offsets`` of ``blocks`` in epoch ``epoch``."""
        keys = epoch * self.num_blocks + blocks         # one inner permutation per (epoch, block)
        within = np.empty_like(offsets)
        last = blocks == self.num_blocks - 1
        if last.any():
            within[last] = self.inner_last(offsets[last], keys[last])
        full = ~last
        if full.any():
            within[full] = self.inner(offsets[full], keys[full])
        return blocks * self.block + within

    def block_positions(self, epoch: int, slot: int) -> np.ndarray:
        """Base positions of the block visited ``slot``-th in epoch ``epoch``, in visiting order
        (the sequence ids are ``base_ids()[positions]``)."""
        k = int(self.layout(epoch)[0][slot])
        # What _in_block computes, with one key for the whole block.
        inner = self.inner_last if k == self.num_blocks - 1 else self.inner
        within = inner(np.arange(inner.n, dtype=np.int64), epoch * self.num_blocks + k)
        within += k * self.block
        return within

    def __call__(self, positions: np.ndarray, epoch: Epochs) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        flat, epochs = pos.reshape(-1), np.broadcast_to(np.asarray(epoch, np.int64), pos.shape)
        epochs = epochs.reshape(-1)
        out = np.empty(flat.shape[0], dtype=np.int64)
        # Chunks bound the per-element round keys of the inner permutations (64 bytes each).
        chunk = 1 << 16
        for lo in range(0, flat.shape[0], chunk):
            r, ep, dest = flat[lo:lo + chunk], epochs[lo:lo + chunk], out[lo:lo + chunk]
            for e in np.unique(ep):
                mask = ep == e
                order, starts = self.layout(int(e))
                slot = np.searchsorted(starts, r[mask], side="right") - 1
                dest[mask] = self._in_block(order[slot], r[mask] - starts[slot], int(e))
        return self.base_ids()[out].astype(np.int64).reshape(pos.shape)
