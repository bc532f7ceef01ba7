"""Which image is which in a generation run, as pure functions of (seed, index, settings).

Image i gets its class, its starting noise and (for ancestral solvers) its later noise from a
generator seeded by (seed, i) alone, and it is computed in a batch fixed by i: shard s holds
images [s S, (s + 1) S) and is split into batches of B from its start. Work is handed out in
whole shards, so neither the number of ranks nor a restart can change an image's bytes.
"""
from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass

import torch

_MASK = 2**64 - 1


def _mix(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): well-spread generator seeds for neighbouring indices."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) & (2**63 - 1)


@dataclass(frozen=True)
class GenerationPlan:
    total: int
    num_classes: int
    seed: int
    shard_samples: int
    batch: int
    # None: class i % num_classes (K per class, every shard mixing all classes);
    # else each image's class is drawn from these weights by its own generator.
    class_weights: tuple[float, ...] | None = None

    @property
    def shards(self) -> int:
        return -(-self.total // self.shard_samples)

    def shard_indices(self, shard: int) -> range:
        return range(shard * self.shard_samples, min((shard + 1) * self.shard_samples, self.total))

    def batches(self, shard: int) -> list[range]:
        indices = self.shard_indices(shard)
        return [indices[i:i + self.batch] for i in range(0, len(indices), self.batch)]

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix(self.seed, index))

    def draw(self, indices: range, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
        """Classes, starting noise and the still-running per-image generators of a batch (on the CPU)."""
        generators = [self.generator(i) for i in indices]
        labels = [self._label(i, g) for i, g in zip(indices, generators)]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return torch.tensor(labels), noise, generators

    def _label(self, index: int, generator: torch.Generator) -> int:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))  # drawn in both modes: same noise
        if self.class_weights is None:
            return index % self.num_classes
        return min(bisect.bisect_right(self._cumulative, u), self.num_classes - 1)

    @functools.cached_property
    def _cumulative(self) -> list[float]:
        """The class distribution's CDF, computed once per plan rather than once per image."""
        total = sum(self.class_weights)
        return [c / total for c in itertools.accumulate(self.class_weights)]
