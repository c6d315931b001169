"""`recis train --config FILE.toml`: a training job described in TOML.

Every section and field, with its default (a field not listed here is an
error that names it):

```toml
[data]
train = ["data/train"]        # ORC files or directories of *.orc (required)
eval = ["data/eval"]          # held-out data for evaluation (default: none)
label = "label"               # label column: values must be 0 or 1
dense = ["I1", "I2"]          # numeric columns stacked into the model's dense input (default: none)
dense_transform = "none"      # "none" or "log1p" (log(1 + max(x, 0)), for counts); NaN/null reads as 0
non_finite = "error"          # ±inf in a float column (or a float64 dense value beyond float32's range):
                              # "error" (names the file, column and row), "clamp" (to ±3.4e38, float32's
                              # largest) or "zero"; NaN is a null (the reader cannot tell a stored NaN from
                              # one) and reads as 0
group = "user_id"             # integer column to group GAUC by (default: no GAUC)
batch_size = 4096
shuffle = true                # seeded shuffle, per epoch, of the stripes and (shuffle_buffer) the rows
seed = 0
shuffle_buffer = 1048576      # with shuffle: rows are shuffled in windows of at least this many rows (whole
                              # stripes), across stripes and files; memory: one window of decoded rows (2^20 rows
                              # of 40 int64 columns: 336 MB); 0: shuffle the stripes only (with one stripe a file,
                              # every epoch sees the same batches). A checkpoint resumes only the same value
num_threads = 2               # ORC decoder threads
prefetch = 4                  # stripes decoded ahead

[model]
name = "deepfm"               # "deepfm", "dlrm", "dcnv2" or "wide_deep"
dim = 16                      # embedding width
# further keys are the model's own arguments, e.g. hidden = [400, 400, 400]
# (deepfm, dcnv2, wide_deep), bottom / top (dlrm), cross_layers / rank (dcnv2),
# coalesce = false (every model: a physical table per feature table instead of
# one per config)

[[feature]]                   # one per sparse field (at least one)
name = "C1"                   # the model's name for it
column = "C1"                 # ORC column (default: name): int64, list<int64>, or strings with hash = true
hash = false                  # hash strings to ids at read time (FarmHash Fingerprint64)
bucket = 0                    # with hash: ids modulo bucket (0: none)
combiner = "sum"              # "sum" or "mean" of a row's ids
shared = "items"              # features naming the same shared table use one table (default: own table)
init_std = 0.01               # new rows ~ Normal(0, init_std), a function of (seed, id)
admit_after = 1               # an id gets a row at its k-th sighting (1: at once)
ttl_steps = 0                 # eviction: ids unseen for this many steps (0: never)
min_frequency = 0             # eviction: ids seen fewer times (0: none)
max_rows = 0                  # eviction: keep at most this many rows, LRU (0: no cap; features of one config
                              # share one physical table, which keeps features x max_rows, ranked together)
eval_missing = "zeros"        # unknown ids in evaluation: "zeros" or "initial"

[optimizer]
dense = "adam"                # "adam", "adamw", "sgd" or "adagrad"
dense_lr = 0.001
dense_weight_decay = 0.0
sparse = "adam"               # "adam", "adamw", "adagrad", "rowwise_adagrad" or "sgd"
sparse_lr = 0.001
sparse_weight_decay = 0.0

[trainer]                     # recis.framework.TrainingArguments
output_dir = "runs/job"       # required: logs, checkpoints, curves
epochs = 1
max_steps = 0                 # 0: run the epochs
gradient_accumulation_steps = 1
mixed_precision = "none"      # "none", "bf16" or "fp16"
sparse_update = "auto"        # "auto", "in_backward" or "deferred": when the sparse optimizer updates
log_every_steps = 10
eval_every_steps = 0          # 0: only at the end
save_every_steps = 0          # 0: only at the end
keep_checkpoints = 3
evict_every_steps = 0         # 0: never
resume = true                 # continue from output_dir's latest checkpoint
resume_suspect = false        # false: checkpoints that saved a NaN/inf are set aside, resume from the last good one
warm_start = "runs/old/checkpoints"  # with no checkpoint to resume: start from this one (default: none)
warm_start_parts = ["sparse", "dense"]  # its parts to load: "sparse", "dense", "optimizer"
collective_timeout = 0        # under torchrun: seconds a rank may go silent (or a collective wait) before every
                              # rank exits, status 3, naming it; 0: $RECIS_COLLECTIVE_TIMEOUT, else 300;
                              # `recis train --collective-timeout` overrides; it must exceed a checkpoint save
```

Paths are relative to the config file's directory.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import MISSING, dataclass, field, fields

import tomllib
import torch

from recis.io.dataset import NON_FINITE, SHUFFLE_BUFFER, DataError


class ConfigError(ValueError):
    """A bad config; the message names the file, section and field."""


@dataclass
class DataConfig:
    train: list[str]
    eval: list[str] = field(default_factory=list)
    label: str = "label"
    dense: list[str] = field(default_factory=list)
    dense_transform: str = "none"
    non_finite: str = "error"
    group: str | None = None
    batch_size: int = 4096
    shuffle: bool = True
    seed: int = 0
    shuffle_buffer: int = SHUFFLE_BUFFER
    num_threads: int = 2
    prefetch: int = 4


@dataclass
class FeatureConfig:
    name: str
    column: str | None = None
    hash: bool = False
    bucket: int = 0
    combiner: str = "sum"
    shared: str | None = None
    init_std: float = 0.01
    admit_after: int = 1
    ttl_steps: int = 0
    min_frequency: int = 0
    max_rows: int = 0
    eval_missing: str = "zeros"


@dataclass
class OptimizerConfig:
    dense: str = "adam"
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    sparse: str = "adam"
    sparse_lr: float = 1e-3
    sparse_weight_decay: float = 0.0


@dataclass
class TrainerConfig:
    output_dir: str
    epochs: int = 1
    max_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "none"
    sparse_update: str = "auto"
    log_every_steps: int = 10
    eval_every_steps: int = 0
    save_every_steps: int = 0
    keep_checkpoints: int = 3
    evict_every_steps: int = 0
    resume: bool = True
    resume_suspect: bool = False
    warm_start: str = ""
    warm_start_parts: list[str] = field(default_factory=lambda: ["sparse", "dense"])
    collective_timeout: float = 0.0


@dataclass
class JobConfig:
    path: str
    data: DataConfig
    features: list[FeatureConfig]
    model: dict
    optimizer: OptimizerConfig
    trainer: TrainerConfig


def _typed(cls, table, where: str):
    """``cls`` from a TOML table: unknown fields, missing required ones and
    wrong types are errors naming ``where`` and the field."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} (known: {sorted(known)})")
    hints = {f.name: f.type for f in fields(cls)}
    for name, value in table.items():
        want = hints[name]
        ok = {
            "str": isinstance(value, str),
            "str | None": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }[want]
        if not ok:
            raise ConfigError(f"{where}.{name}: expected {want}, got {value!r}")
    missing = [
        f for f, spec in known.items() if f not in table and spec.default is MISSING and spec.default_factory is MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    return cls(**table)


def _one_of(value, allowed, where):
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")


def load_config(path: str) -> JobConfig:
    """Parses and checks a job config (see the module docstring)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(raw) - {"data", "model", "feature", "optimizer", "trainer"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} (known: data, feature, model, optimizer, trainer)")
    for section in ("data", "feature", "trainer"):
        if section not in raw:
            raise ConfigError(
                f"{path}: missing section [{section}]" if section != "feature" else f"{path}: no [[feature]]"
            )
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))  # noqa: E731
    data = _typed(DataConfig, raw["data"], f"{path}: [data]")
    data.train, data.eval = [rel(p) for p in data.train], [rel(p) for p in data.eval]
    if not data.train:
        raise ConfigError(f"{path}: [data].train names no files")
    _one_of(data.dense_transform, ("none", "log1p"), f"{path}: [data].dense_transform")
    _one_of(data.non_finite, NON_FINITE, f"{path}: [data].non_finite")
    if data.shuffle_buffer < 0:
        raise ConfigError(f"{path}: [data].shuffle_buffer: must be >= 0 rows, got {data.shuffle_buffer}")
    if not isinstance(raw["feature"], list):
        raise ConfigError(f"{path}: features are [[feature]] tables (an array), not one [feature] table")
    features = []
    for i, t in enumerate(raw["feature"]):
        label = f" ({t['name']})" if isinstance(t, dict) and isinstance(t.get("name"), str) else ""
        features.append(_typed(FeatureConfig, t, f"{path}: [[feature]] #{i + 1}{label}"))
    names = [f.name for f in features]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: [[feature]] names repeated: {dup}")
    for i, f in enumerate(features):
        where = f"{path}: [[feature]] #{i + 1} ({f.name})"
        _one_of(f.combiner, ("sum", "mean"), f"{where}.combiner")
        _one_of(f.eval_missing, ("zeros", "initial"), f"{where}.eval_missing")
        for k in ("bucket", "ttl_steps", "min_frequency", "max_rows"):
            if getattr(f, k) < 0:
                raise ConfigError(f"{where}.{k}: must be >= 0, got {getattr(f, k)}")
        if f.admit_after < 1:
            raise ConfigError(f"{where}.admit_after: must be >= 1, got {f.admit_after}")
    model = dict(raw.get("model", {}))
    from recis.models import MODELS

    model.setdefault("name", "deepfm")
    model.setdefault("dim", 16)
    _one_of(model["name"], sorted(MODELS), f"{path}: [model].name")
    params = inspect.signature(MODELS[model["name"]]).parameters
    allowed = set(params) - {"sparse_fields", "num_dense", "option", "seed"}
    unknown = sorted(set(model) - allowed - {"name"})
    if unknown:
        raise ConfigError(f"{path}: [model] unknown field(s) {unknown} for {model['name']} (known: {sorted(allowed)})")
    optimizer = _typed(OptimizerConfig, raw.get("optimizer", {}), f"{path}: [optimizer]")
    _one_of(optimizer.dense, DENSE_OPTIMIZERS, f"{path}: [optimizer].dense")
    _one_of(optimizer.sparse, SPARSE_OPTIMIZERS, f"{path}: [optimizer].sparse")
    trainer = _typed(TrainerConfig, raw["trainer"], f"{path}: [trainer]")
    trainer.output_dir = rel(trainer.output_dir)
    if trainer.warm_start:
        trainer.warm_start = rel(trainer.warm_start)
    for part in trainer.warm_start_parts:
        _one_of(part, ("sparse", "dense", "optimizer"), f"{path}: [trainer].warm_start_parts")
    _one_of(trainer.mixed_precision, ("none", "bf16", "fp16"), f"{path}: [trainer].mixed_precision")
    _one_of(trainer.sparse_update, ("auto", "in_backward", "deferred"), f"{path}: [trainer].sparse_update")
    if trainer.collective_timeout < 0:
        raise ConfigError(
            f"{path}: [trainer].collective_timeout: must be >= 0 seconds, got {trainer.collective_timeout}"
        )
    return JobConfig(path, data, features, model, optimizer, trainer)


DENSE_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}
SPARSE_OPTIMIZERS = ("adam", "adamw", "adagrad", "rowwise_adagrad", "sgd")


class Job:
    """What a config builds: datasets, model, optimizers, Trainer."""

    def __init__(self, cfg: JobConfig, for_training: bool = True):
        from recis import optim
        from recis.framework import Trainer, TrainingArguments
        from recis.io import Column, OrcDataset
        from recis.models import MODELS
        from recis.nn import AlwaysAdmit, CountAdmit, EmbeddingOption, EvictionOption, NormalInit

        self.cfg = cfg
        d, t, o = cfg.data, cfg.trainer, cfg.optimizer
        columns, seen = [Column(d.label)], {d.label}
        for name in d.dense + ([d.group] if d.group else []):
            if name not in seen:
                columns.append(Column(name))
                seen.add(name)
        for f in cfg.features:
            col = f.column or f.name
            if col in seen:
                raise ConfigError(f"{cfg.path}: column {col!r} is read twice (a feature, label, dense or group)")
            seen.add(col)
            columns.append(Column(col, hash=f.hash, bucket=f.bucket))
        kw = dict(
            batch_size=d.batch_size,
            columns=columns,
            num_threads=d.num_threads,
            prefetch=d.prefetch,
            non_finite=d.non_finite,
        )
        self.train_dataset = (
            OrcDataset(d.train, shuffle=d.shuffle, seed=d.seed, shuffle_buffer=d.shuffle_buffer, **kw)
            if for_training
            else None
        )
        self.eval_dataset = OrcDataset(d.eval, **kw) if d.eval else None
        cls = MODELS[cfg.model["name"]]
        dim = cfg.model["dim"]
        width = dim + getattr(cls, "extra_width", 0)
        options = {}
        for i, f in enumerate(cfg.features):
            eviction = None
            if f.ttl_steps or f.min_frequency or f.max_rows:
                eviction = EvictionOption(
                    ttl_steps=f.ttl_steps or None, min_frequency=f.min_frequency or None, max_rows=f.max_rows or None
                )
            options[f.name] = EmbeddingOption(
                dim=width,
                initializer=NormalInit(0.0, f.init_std),
                combiner=f.combiner,
                admission=CountAdmit(f.admit_after) if f.admit_after > 1 else AlwaysAdmit(),
                eviction=eviction,
                shared_name=f.shared,
                seed=d.seed + (i if f.shared is None else sum(map(ord, f.shared))),
                eval_missing=f.eval_missing,
            )
        kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        torch.manual_seed(d.seed)
        self.model = cls(options, num_dense=len(d.dense), seed=d.seed, **kwargs)
        self.dense_optimizer = DENSE_OPTIMIZERS[o.dense](
            self.model.parameters(), lr=o.dense_lr, weight_decay=o.dense_weight_decay
        )
        sparse_cls = {
            "adam": optim.SparseAdam,
            "adamw": optim.SparseAdamW,
            "adagrad": optim.SparseAdagrad,
            "rowwise_adagrad": optim.SparseRowWiseAdagrad,
            "sgd": optim.SparseSGD,
        }[o.sparse]
        self.sparse_optimizer = sparse_cls(self.model, lr=o.sparse_lr, weight_decay=o.sparse_weight_decay)
        self.args = TrainingArguments(
            output_dir=t.output_dir,
            epochs=t.epochs,
            max_steps=t.max_steps or None,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=None if t.mixed_precision == "none" else t.mixed_precision,
            sparse_update=t.sparse_update,
            log_every_steps=t.log_every_steps,
            eval_every_steps=t.eval_every_steps or None,
            save_every_steps=t.save_every_steps or None,
            keep_checkpoints=t.keep_checkpoints,
            evict_every_steps=t.evict_every_steps or None,
            resume=t.resume,
            resume_suspect=t.resume_suspect,
            warm_start=t.warm_start or None,
            warm_start_parts=tuple(t.warm_start_parts),
            collective_timeout=t.collective_timeout or None,
            label_key=d.label,
            group_key=d.group,
        )
        self.trainer = Trainer(
            self.model,
            self.args,
            self.train_dataset,
            self.eval_dataset,
            dense_optimizer=self.dense_optimizer,
            sparse_optimizer=self.sparse_optimizer,
            input_fn=self.input_fn,
        )

    def input_fn(self, batch: dict) -> dict:
        """A reader batch as model input: each feature's ids (a scalar int
        column becomes one id a row), and the dense columns stacked."""
        d = self.cfg.data
        out = {}
        for f in self.cfg.features:
            v = batch[f.column or f.name]
            if isinstance(v, torch.Tensor):
                if v.dtype != torch.int64 or v.dim() != 1:
                    raise ConfigError(
                        f"{self.cfg.path}: feature {f.name!r}: column {f.column or f.name!r} holds {v.dtype} values; "
                        "a feature needs integer ids (or strings with hash = true)"
                    )
                v = v.unsqueeze(1)
            out[f.name] = v
        if d.dense:
            x = torch.stack([batch[c].to(torch.float32) for c in d.dense], dim=1)
            if not bool(torch.isfinite(x).all()):
                x = self._finite_dense(batch, x)
            if d.dense_transform == "log1p":
                x = torch.log1p(x.clamp_min(0))
            out["dense"] = x
        return out

    def _finite_dense(self, batch: dict, x: torch.Tensor) -> torch.Tensor:
        """The dense input ``x`` [B, len(dense)] with NaN (a null) as 0 and
        ±inf per ``[data] non_finite``. The reader has already refused (or
        replaced) ±inf in its columns, so an inf here is a float64 value
        beyond float32's range."""
        d = self.cfg.data
        inf = torch.isinf(x)
        if d.non_finite == "error" and bool(inf.any()):
            row, j = (int(i) for i in inf.nonzero()[0])
            raise DataError(
                f"{self.cfg.path}: [data].dense column {d.dense[j]!r}, row {row} of a batch: "
                f"{float(batch[d.dense[j]][row])!r} is beyond float32's range (the dense input is float32); "
                '[data] non_finite = "clamp" or "zero" replaces such values'
            )
        zero = 0.0 if d.non_finite == "zero" else None  # None: nan_to_num clamps to float32's largest
        return torch.nan_to_num(x, nan=0.0, posinf=zero, neginf=zero)
