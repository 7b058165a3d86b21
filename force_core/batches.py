"""The batch stream every mask computation reads: (inputs, targets) batches moved to the device once, cycled.

Imports torch and the stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class BatchStream:
    """Cycles through `batches`, moving each batch to the device once.

    A sequence (or a one-shot iterator) is kept on the device after each batch's first use and
    cycled; another re-iterable source (a DataLoader) is iterated again when exhausted, giving fresh
    draws as in the reference code.
    """

    def __init__(self, batches: Iterable, device: torch.device):
        self.device = device
        self._source = batches
        self._is_seq = isinstance(batches, Sequence)
        self._it = None if self._is_seq else iter(batches)
        self._one_shot = self._it is batches
        self._cache: list = []
        self._pos = 0
        self._exhausted = False
        self.first = self._fetch()
        if self.first is None:
            raise ValueError("batches is empty: pass at least one (inputs, targets) batch")
        self._cache.append(self.first)

    def _move(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _fetch(self):
        """The next new batch from the source, or None when it is exhausted."""
        if self._is_seq:
            i = len(self._cache)
            return self._move(self._source[i]) if i < len(self._source) else None
        try:
            return self._move(next(self._it))
        except StopIteration:
            return None

    def next(self):
        if self._pos < len(self._cache):
            b = self._cache[self._pos]
        elif self._exhausted:
            self._pos = 0
            b = self._cache[0]
        else:
            b = self._fetch()
            if b is None and not (self._is_seq or self._one_shot):  # re-iterable: draw again
                self._it = iter(self._source)
                b = self._fetch()
            if b is None:
                self._exhausted = True
                self._pos = 0
                b = self._cache[0]
            elif self._is_seq or self._one_shot:
                self._cache.append(b)
            else:
                self._cache, self._pos = [b], 0  # fresh draws are not kept
        self._pos += 1
        return b

    def take(self, n: int) -> list:
        return [self.next() for _ in range(n)]


__all__ = ["BatchStream"]
