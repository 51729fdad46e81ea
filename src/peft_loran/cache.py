"""The eval cache: a layer's dense update (or its effective weight ``W + s f(BA)``) kept between no-grad calls.

Off by default (``LoranConfig.eval_cache``): each entry is one weight-sized matrix per adapted layer, more than
training needs, so an evaluation inside training could need more memory than training itself. Switched on
(``peft_loran.set_eval_cache(model, True, max_mb=...)``) it makes generation with an unmerged adapter run at the
base model's speed.

An entry can never serve an old update: staleness is ruled out by construction rather than by tracking every way a
tensor can change. The factors (small) are compared by value with a snapshot taken when the entry was built, so
in-place writes (also through ``.data``, which bumps no version), replaced parameters and loaded state dicts are
all seen; the scaling and activation objects are compared as they are; the frozen base weight (large) by its
storage, which the entry keeps alive so that no new tensor can reuse its address, and its in-place version. The
layer clears the cache on ``.to()``, merges, adapter switches and training forwards.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import torch


class CacheBudget:
    """A memory budget shared by the eval caches of a model's LoRAN layers (``set_eval_cache(model, max_mb=...)``).
    A layer whose cached tensor would not fit computes its update per call instead (slower, no extra memory)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = int(max_bytes), 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.max_bytes:
                return False
            self.used += nbytes
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)


class CacheEntry:
    """A cached tensor (``value``) and what it was built from."""

    __slots__ = ("snapshot", "settings", "storage", "weight_key", "value", "charged")

    def __init__(self, snapshot, settings, weight, value, charged: int = 0):
        self.snapshot, self.settings, self.value, self.charged = snapshot, settings, value, charged
        self.storage = weight.untyped_storage() if weight is not None else None  # kept alive: no address reuse
        self.weight_key = self._weight_key(weight)

    @staticmethod
    def _weight_key(weight):
        if weight is None:
            return None
        return (weight.data_ptr(), weight._version, weight.shape, weight.stride(), weight.dtype, weight.device)

    def matches(self, factors: Sequence[torch.Tensor], settings: Sequence[tuple], weight) -> bool:
        if len(factors) != len(self.snapshot) or len(settings) != len(self.settings):
            return False
        if any(s != t or f is not g for (s, f), (t, g) in zip(settings, self.settings)):
            return False
        # the old weight's storage is kept alive by the entry, so a new weight cannot sit at its address
        if weight is not None and self._weight_key(weight) != self.weight_key:
            return False
        return all(_same_values(old, new) for old, new in zip(self.snapshot, factors))


def _same_values(old: torch.Tensor, new: torch.Tensor) -> bool:
    return new.dtype == old.dtype and new.shape == old.shape and new.device == old.device and torch.equal(old, new)


class EvalCache(dict):
    """One layer's cache: slot -> :class:`CacheEntry`. Entries leaving it (cleared, replaced) give their bytes back
    to the model's :class:`CacheBudget`."""

    def __init__(self) -> None:
        super().__init__()
        self.budget: Optional[CacheBudget] = None
        self._lock = threading.Lock()

    def __reduce__(self):
        """Copies (``deepcopy``, pickling) start empty: the cached tensors belong to the layer they were built for."""
        return (EvalCache, ())

    def _release(self, entry) -> None:
        if entry is not None and self.budget is not None and entry.charged:
            self.budget.give_back(entry.charged)

    def pop(self, key, default=None):
        entry = super().pop(key, None)
        self._release(entry)
        return entry if entry is not None else default

    def clear(self) -> None:
        for entry in self.values():
            self._release(entry)
        super().clear()

    def get_or_build(self, slot: tuple, factors: Sequence[torch.Tensor], settings: Sequence[tuple],
                     build: Callable[[], torch.Tensor], nbytes: int,
                     weight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The value ``build()`` made for ``slot`` from these ``factors``, ``settings`` and ``weight``, rebuilt when
        any of them changed; None when the value (``nbytes``) does not fit the budget (compute per call then)."""
        entry = self.get(slot)
        if entry is not None and entry.matches(factors, settings, weight):
            return entry.value
        with self._lock:  # one builder at a time; a second thread finds the finished entry
            entry = self.get(slot)
            if entry is not None and entry.matches(factors, settings, weight):
                return entry.value
            self.pop(slot, None)  # free the stale tensor before building its replacement
            if self.budget is not None and not self.budget.take(nbytes):
                return None
            snapshot = [t.detach().clone(memory_format=torch.contiguous_format) for t in factors]
            value = build()
            self[slot] = CacheEntry(snapshot, settings, weight, value, nbytes if self.budget else 0)
        return value
