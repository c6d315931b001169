"""Pieces the zoo's models share: the sparse fields' engine and MLPs."""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace

import torch
from torch import nn

from recis.nn import DEFAULT_INITIALIZER, EmbeddingEngine, EmbeddingOption
from recis.nn.options import name_seed, option_to_json


def zoo_model(name: str):
    """Class decorator of a zoo model: records the arguments each instance
    was built with (but its sparse fields, which its engine holds), so that
    ``model_spec`` can describe it and ``models.build_model`` rebuild it
    (serving exports, checkpoints)."""

    def wrap(cls):
        init = cls.__init__
        sig = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            init(self, *args, **kwargs)
            recorded = dict(bound.arguments)
            for key in ("self", "sparse_fields", "option"):
                recorded.pop(key, None)
            self._zoo_args = {k: list(v) if isinstance(v, tuple) else v for k, v in recorded.items()}

        cls.__init__ = __init__
        cls.zoo_name = name
        return cls

    return wrap


def model_spec(model: nn.Module) -> dict | None:
    """What rebuilds ``model`` (a zoo model), as JSON: its zoo name, its
    arguments and every sparse field's option, as [name, option] pairs in
    order; None for a model
    that is not from the zoo."""
    args = getattr(model, "_zoo_args", None)
    if args is None or not hasattr(model, "embedding"):
        return None
    return {
        "name": type(model).zoo_name,
        "args": dict(args),
        # In order (the model's inputs follow it): a list, never a JSON object's keys.
        "features": [[f, option_to_json(o)] for f, o in model.embedding.options.items()],
    }


class FieldProjection(nn.Module):
    """Per-feature dims: each table whose ``dim`` differs from the model's
    ``width`` gets its own bias-free ``nn.Linear(dim, width)``, applied to
    every field of that table (a shared table's fields, a history and its
    target, share one), so that every field reaches the model at ``width``.
    The other fields pass through untouched; with no such table the module
    has no parameters and adds no ``state_dict`` key."""

    def __init__(self, options: dict, width: int):
        super().__init__()
        self.width = width
        self.table_of: dict[str, str] = {}
        proj: dict[str, nn.Linear] = {}
        keys: dict[str, str] = {}
        for f, o in options.items():
            if o.dim == width:
                continue
            table = o.shared_name or f
            # A ModuleDict key cannot hold ".": the table's name, spelt safely.
            key = table.replace(".", "_")
            if keys.setdefault(key, table) != table:
                raise ValueError(f"tables {keys[key]!r} and {table!r} both project as {key!r}: rename one")
            if key not in proj:
                proj[key] = nn.Linear(o.dim, width, bias=False)
            self.table_of[f] = key
        self.proj = nn.ModuleDict(proj)

    def forward(self, out: dict) -> dict:
        """``out`` (field → [..., dim]) with each projected field at ``width``,
        in its own dtype."""
        return {
            f: self.proj[self.table_of[f]](v.to(self.proj[self.table_of[f]].weight.dtype)).to(v.dtype)
            if f in self.table_of
            else v
            for f, v in out.items()
        }

    def stacked(self, engine: EmbeddingEngine, batch: dict, fields: list[str]) -> torch.Tensor:
        """``engine.stacked(batch, fields)`` with the fields projected:
        [B, len(fields), width] (with no projection, the engine's own
        tensor, no copy)."""
        if not self.table_of:
            return engine.stacked(batch, fields)
        out = self(engine(batch))
        return torch.stack([out[f] for f in fields], dim=1)


def sparse_engine(
    fields, width: int, seed: int = 0, coalesce: bool = True, sequences=()
) -> tuple[list[str], EmbeddingEngine, FieldProjection]:
    """(field names, an EmbeddingEngine with a logical table per field; fields
    of one config are coalesced into one physical table, one per dim, and
    the ``FieldProjection`` of the fields whose dim is not ``width``).

    ``fields``: a list of names (each gets ``EmbeddingOption(dim=width)``,
    with ``recis.nn.DEFAULT_INITIALIZER``, seeded by its name (``name_seed``) so equal ids
    of two fields start from different rows), or a dict {name: EmbeddingOption}
    (a field's ``dim`` other than ``width`` is projected to it). ``coalesce=False``: a
    physical table per field (the layout of checkpoints written before
    tables were coalesced). ``sequences``: the fields that may be sequences
    (``combiner="tuple"``, [B, L, D]); every other field is pooled."""
    if not fields:
        raise ValueError("a model needs at least one sparse field")
    if isinstance(fields, dict):
        options = dict(fields)
    else:
        base = EmbeddingOption(dim=width, initializer=DEFAULT_INITIALIZER, seed=seed)
        options = {f: replace(base, seed=name_seed(seed, f)) for f in fields}
    pooled = [f for f, o in options.items() if o.combiner == "tuple" and f not in sequences]
    if pooled:
        where = f"this model's sequence field is {list(sequences)}" if sequences else "sequence models: din, bst"
        raise ValueError(
            f"sparse fields {pooled}: this model pools them (combiner 'sum' or 'mean'), not sequences "
            f"(combiner 'tuple'; {where})"
        )
    return list(options), EmbeddingEngine(options, coalesce=coalesce), FieldProjection(options, width)


def check_regularization(dropout, batch_norm, where: str) -> None:
    """``dropout`` a number in [0, 1) and ``batch_norm`` a bool, else a
    ValueError naming ``where``, the argument and its value."""
    if (
        isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0  # NaN fails too
    ):
        raise ValueError(f"{where}: dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(batch_norm, bool):
        raise ValueError(f"{where}: batch_norm must be a bool, got {batch_norm!r}")


def mlp(
    width: int, hidden, out: int | None = 1, dropout: float = 0.0, batch_norm: bool = False
) -> tuple[nn.Sequential, int]:
    """Hidden layers of ``hidden`` widths, each Linear (+ BatchNorm1d with
    ``batch_norm``) + ReLU (+ Dropout(``dropout``) when it is > 0), then a
    Linear to ``out`` (None: no output layer), which is never normalized or
    dropped out. Returns (module, output width).

    The defaults build exactly Linear+ReLU pairs, in the layout (and
    ``state_dict`` names) of the models before these options existed."""
    check_regularization(dropout, batch_norm, "mlp")
    layers = []
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(float(dropout)))
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


def check_vectors(vectors, model: str) -> list[tuple[str, int]]:
    """``vectors`` (a model's precomputed vector inputs: [name, K] pairs, or
    {name: K}) as a list of (name, K); K >= 1 and names distinct."""
    if vectors is None:
        return []
    items = list(vectors.items()) if isinstance(vectors, dict) else [tuple(v) for v in vectors]
    out = []
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str) or isinstance(item[1], bool) or not isinstance(item[1], int):
            raise ValueError(f"{model}: vectors must be [name, width] pairs, got {item!r}")
        if item[1] < 1:
            raise ValueError(f"{model}: vector {item[0]!r} must have a width >= 1, got {item[1]}")
        out.append((item[0], item[1]))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{model}: vectors named twice: {sorted({n for n in names if names.count(n) > 1})}")
    return out


class VectorFields(nn.Module):
    """Precomputed vectors (text or image embeddings: a fixed-length
    ``list<float>`` column, [B, K] in the batch under its name), each
    projected by its own ``nn.Linear(K, width)`` into one more field beside
    the sparse ones: ``forward(batch)`` gives [B, V, width]."""

    def __init__(self, vectors: list[tuple[str, int]], width: int):
        super().__init__()
        self.names = [n for n, _ in vectors]
        self.widths = dict(vectors)
        self.proj = nn.ModuleList(nn.Linear(k, width) for _, k in vectors)

    def __len__(self) -> int:
        return len(self.names)

    def forward(self, batch: dict, dtype=torch.float32) -> torch.Tensor:
        out = []
        for name, proj in zip(self.names, self.proj, strict=True):
            if name not in batch:
                raise KeyError(f"the model takes the vector {name!r} but the batch has no {name!r} tensor")
            x = batch[name]
            k = self.widths[name]
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"batch[{name!r}] must be a [B, {k}] float tensor, got {got}")
            out.append(proj(x.to(proj.weight.dtype)))
        return torch.stack(out, 1).to(dtype)


def sequence_engine(
    fields, width: int, target: str, history: str, seed: int, coalesce: bool, where: str
) -> tuple[list[str], EmbeddingEngine, FieldProjection]:
    """``sparse_engine`` of a sequence model: ``history`` a sequence field
    (``combiner="tuple"``, [B, L, D]) and ``target`` a pooled one, the item
    its history is read against; every other field is pooled.

    ``fields`` as names: ``history`` and ``target`` share one table (the
    target's: ``shared_name=target``, seeded by its name), so that a history
    item and a target item of one id are one row; as {name: EmbeddingOption}
    they are as given (give them one ``shared_name``), but ``history``'s
    combiner must be "tuple" and no other field's."""
    names = list(fields)
    for arg, name in (("target", target), ("history", history)):
        if not isinstance(name, str) or name not in names:
            raise ValueError(f"{where}: {arg}={name!r} must name one of its sparse fields {names}")
    if target == history:
        raise ValueError(f"{where}: target and history are one field {target!r}")
    if not isinstance(fields, dict):
        base = EmbeddingOption(dim=width, initializer=DEFAULT_INITIALIZER, seed=seed)
        shared = replace(base, seed=name_seed(seed, target), shared_name=target)
        fields = {
            f: replace(shared, combiner="tuple")
            if f == history
            else shared
            if f == target
            else replace(base, seed=name_seed(seed, f))
            for f in names
        }
    else:
        if fields[history].combiner != "tuple":
            raise ValueError(
                f"{where}: history {history!r} must be a sequence (combiner 'tuple'), got {fields[history].combiner!r}"
            )
        if fields[target].combiner == "tuple":
            raise ValueError(f"{where}: target {target!r} must be pooled (combiner 'sum' or 'mean'), not 'tuple'")
    return sparse_engine(fields, width, seed, coalesce, sequences=(history,))


def sequence_mask(ids, option: EmbeddingOption, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, length] bool, lengths [B] int64) of a sequence feature's
    input ``ids`` (a RaggedTensor, or [B, L] ids where ``option.padding_id``
    pads): position ``j`` of row ``b`` is an item, not padding, where
    ``j < lengths[b]`` (the engine left-aligns each row's items in [B, L, D])."""
    from recis.nn.dynamic_embedding import as_ragged

    lengths = as_ragged(ids, pad=option.padding_id).lengths().to(torch.int64)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return mask, lengths


def feature_column_map(saved: list[str], mine: list[str], dim: int, tail: int) -> list[int]:
    """For a Linear whose input is the features' embeddings in order
    (``dim`` columns each) and then ``tail`` more columns (vectors, dense):
    the source column in a layer trained on ``saved`` of each column of one
    on ``mine``; -1 for a feature ``saved`` lacks (its columns start at 0,
    so the layer computes what it did until the feature's embeddings learn)."""
    where = {f: k for k, f in enumerate(saved)}
    out = []
    for f in mine:
        k = where.get(f)
        out.extend(range(k * dim, (k + 1) * dim) if k is not None else [-1] * dim)
    out.extend(range(len(saved) * dim, len(saved) * dim + tail))
    return out


def remap_columns(t: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """``t`` [..., old] with its last dimension rebuilt by ``columns``
    (source indices, -1: zeros)."""
    index = torch.tensor([max(c, 0) for c in columns], dtype=torch.long)
    out = t.index_select(-1, index).clone()
    missing = torch.tensor([c < 0 for c in columns])
    if bool(missing.any()):
        out[..., missing] = 0
    return out


class FeatureRemap:
    """Mixin of a zoo model whose dense layers read its features only through
    one first Linear (``_first_linear``: its state_dict key prefix) over the
    features' embeddings in order: ``remap_dense`` adapts dense weights
    trained on other features (added, removed or reordered) to this model's,
    so that a checkpoint resumes after such a change. An added feature's
    columns start at zero: the model computes what it did until its
    embeddings learn; a removed feature's columns are dropped."""

    _first_linear = "mlp.0"

    def remap_dense(self, state: dict, saved: list[str]) -> tuple[dict, dict[str, list[int]]]:
        """(``state`` adapted to this model's features, {key: column map} of
        the weights whose columns moved, for the optimizer's state)."""
        key = f"{self._first_linear}.weight"
        mine = list(self.sparse_fields)
        tail = state[key].shape[1] - len(saved) * self.dim
        columns = feature_column_map(saved, mine, self.dim, tail)
        out = dict(state)
        out[key] = remap_columns(state[key], columns)
        # Per-feature dims: an added feature's projection starts from this
        # model's own initial weights; a removed one's is dropped.
        mine_proj = {k: v for k, v in self.state_dict().items() if k.startswith("project.")}
        for k in [k for k in out if k.startswith("project.") and k not in mine_proj]:
            del out[k]
        for k, v in mine_proj.items():
            out.setdefault(k, v.detach().clone())
        return out, {key: columns}


class SequenceModel(nn.Module):
    """Base of the zoo's sequence models (DIN, BST): ``self.embedding`` looks
    up the pooled fields (``self.pooled_fields``, the target among them) and
    the ``self.history`` sequence; subclasses define ``logits(pooled, seq,
    mask, batch)``."""

    sequence_model = True  # a history feature read as [B, L, D] (config: combiner = "sequence")

    def tables(self):
        return self.embedding.tables()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B] of a batch holding the sparse fields (RaggedTensor or
        [B, L] ids; the history's rows may be empty) and, with
        ``num_dense``, ``"dense"`` [B, num_dense]."""
        return self.logits(*self.lookup(batch), batch)

    def lookup(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled [B, F, dim]: the pooled fields in order, history
        [B, L, dim] zero-padded, mask [B, L]: True at the history's items)."""
        out = self.project(self.embedding(batch))
        seq = out[self.history]
        mask, _ = sequence_mask(batch[self.history], self.embedding.options[self.history], seq.shape[1])
        pooled = torch.stack([out[f] for f in self.pooled_fields], dim=1)
        return pooled, seq, mask.to(seq.device)
