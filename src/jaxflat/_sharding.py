"""Meshes: where a flat vector goes when the parameters are sharded."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def flat_sharding(params: list[Any]) -> Any:
    """A 1-D sharding for the flat vector of sharded ``params``.

    The vector is spread over as many of the mesh's devices as its length
    allows: the largest product of mesh axes that divides the length (all
    axes when it divides evenly), replicated over the rest.
    """
    mesh = next(
        (p.sharding.mesh for p in params if isinstance(p.sharding, NamedSharding)), None
    )
    if mesh is None:
        return None  # some other multi-device sharding: let XLA choose
    n = sum(int(np.prod(p.shape, dtype=np.int64)) for p in params)
    names = [a for a in mesh.axis_names if mesh.shape[a] > 1]
    best: tuple[str, ...] = ()
    for r in range(len(names), 0, -1):
        for axes in itertools.combinations(names, r):
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if n % size == 0 and size > int(np.prod([mesh.shape[a] for a in best] or [1])):
                best = axes
    spec = PartitionSpec(best if best else None)
    return NamedSharding(mesh, spec)

