"""Pieces the zoo's models share: the sparse fields' engine and MLPs."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from recis.nn import DEFAULT_INITIALIZER, EmbeddingEngine, EmbeddingOption


def sparse_engine(fields, width: int, seed: int = 0, coalesce: bool = True) -> tuple[list[str], EmbeddingEngine]:
    """(field names, an EmbeddingEngine with a logical table per field; fields
    of one config are coalesced into one physical table).

    ``fields``: a list of names (each gets ``EmbeddingOption(dim=width)``,
    with ``recis.nn.DEFAULT_INITIALIZER``, seeded apart per field so equal ids
    of two fields start from different rows), or a dict {name: EmbeddingOption}
    of options whose ``dim`` must be ``width``. ``coalesce=False``: a
    physical table per field (the layout of checkpoints written before
    tables were coalesced)."""
    if not fields:
        raise ValueError("a model needs at least one sparse field")
    if isinstance(fields, dict):
        options = dict(fields)
        bad = {f: o.dim for f, o in options.items() if o.dim != width}
        if bad:
            raise ValueError(f"sparse field options must have dim={width} for this model, got {bad}")
    else:
        base = EmbeddingOption(dim=width, initializer=DEFAULT_INITIALIZER, seed=seed)
        options = {f: replace(base, seed=(seed + i) % 2**64) for i, f in enumerate(fields)}
    pooled = [f for f, o in options.items() if o.combiner == "tuple"]
    if pooled:
        raise ValueError(f"sparse fields {pooled}: zoo models pool every field (combiner 'sum' or 'mean')")
    return list(options), EmbeddingEngine(options, coalesce=coalesce)


def mlp(width: int, hidden, out: int | None = 1) -> tuple[nn.Sequential, int]:
    """Linear+ReLU layers of ``hidden`` widths, then a Linear to ``out``
    (None: no output layer). Returns (module, output width)."""
    layers = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    if out is not None:
        layers.append(nn.Linear(width, out))
        width = out
    return nn.Sequential(*layers), width


def dense_input(batch: dict, num_dense: int, dtype=torch.float32) -> torch.Tensor | None:
    if not num_dense:
        return None
    if "dense" not in batch:
        raise KeyError(f"the model has num_dense={num_dense} but the batch has no 'dense' tensor")
    dense = batch["dense"]
    if dense.dim() != 2 or dense.shape[1] != num_dense:
        raise ValueError(f"batch['dense'] must be [B, {num_dense}], got {tuple(dense.shape)}")
    return dense.to(dtype)
