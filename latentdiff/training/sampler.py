"""The order examples are seen in: an endless stream of shuffled epochs, split across processes, resumable."""

from __future__ import annotations

import random


class ResumableBatches:
    """Micro-batch m of rank r holds stream positions [m G + r B, m G + (r+1) B), G = B * world_size.

    Position p is example perm_e[p mod n] of epoch e = p // n, where perm_e is a seeded shuffle: the order is a
    function of (seed, p) alone, so resuming only needs the number of micro-batches consumed (`start`).
    Items are (epoch, index) keys, so per-example randomness can depend on the epoch too.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ):
        if n <= 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.start = rank, world_size, shuffle, start
        self._epoch, self._perm = -1, list(range(n))

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._perm = list(range(self.n))
            if self.shuffle:
                random.Random(f"order:{self.seed}:{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm

    def batch(self, m: int) -> list[tuple[int, int]]:
        first = m * self.batch_size * self.world_size + self.rank * self.batch_size
        keys = []
        for p in range(first, first + self.batch_size):
            epoch, i = divmod(p, self.n)
            keys.append((epoch, self.permutation(epoch)[i]))
        return keys

    def epoch_of(self, m: int) -> float:
        """How many passes over the data micro-batch m completes (for logs)."""
        return (m + 1) * self.batch_size * self.world_size / self.n

    def __iter__(self):
        m = self.start
        while True:
            yield self.batch(m)
            m += 1
