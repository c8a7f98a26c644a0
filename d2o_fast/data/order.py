"""The global sample order, shared by every loader backend and every world size.

The stream is an endless concatenation of epochs; epoch e visits all N items once, in a
permutation seeded by (seed, e). Stream position p is item perm_e[p % N] with e = p // N.
A global batch is G = world_size * batch_per_device consecutive positions and rank r takes
positions [r*B, (r+1)*B) of it, so one process with batch 2B sees exactly the union of what two
processes with batch B see, in the same order. The horizontal-flip coin is seeded by
(seed, e) and indexed by the item, so it too is independent of world size, batch size and
worker count. A position (epoch, offset) is all a loader needs to resume on the exact next batch.
"""

import threading

import numpy as np

PERMUTATION_STREAM, FLIP_STREAM = 0, 1      # independent RNG streams per epoch


class SampleOrder:
    def __init__(self, num_items, seed, xflip):
        if num_items <= 0:
            raise ValueError(f'num_items must be positive, got {num_items}')
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.xflip = bool(xflip)
        self._plans = {}        # epoch -> (permutation, flip coin per item); a batch spans <= a few epochs
        self._lock = threading.Lock()                # loader worker threads share one order

    def _rng(self, epoch, stream):
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, stream])))

    def epoch_plan(self, epoch):
        """(permutation of item indices, bool flip coin per item index) of one epoch."""
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                if len(self._plans) >= 4:
                    self._plans.pop(min(self._plans))
                plan = self._plans[epoch] = self._make_plan(epoch)
            return plan

    def _make_plan(self, epoch):
        perm = self._rng(epoch, PERMUTATION_STREAM).permutation(self.num_items)
        if self.xflip:
            coins = self._rng(epoch, FLIP_STREAM).integers(0, 2, size=self.num_items, dtype=np.uint8) == 1
        else:
            coins = np.zeros(self.num_items, dtype=bool)
        return perm, coins

    def take(self, position, count):
        """(item indices int64 [count], flips bool [count]) at stream positions [position, position + count)."""
        indices = np.empty(count, dtype=np.int64)
        flips = np.empty(count, dtype=bool)
        done = 0
        while done < count:
            epoch, offset = divmod(position + done, self.num_items)
            n = min(count - done, self.num_items - offset)
            perm, coins = self.epoch_plan(epoch)
            indices[done:done + n] = perm[offset:offset + n]
            flips[done:done + n] = coins[indices[done:done + n]]
            done += n
        return indices, flips
