"""`recis train --config FILE.toml`: a training job described in TOML.

Every section and field, with its default (a field not listed here is an
error that names it):

```toml
[data]
train = ["data/train"]        # ORC files or directories of *.orc (required)
eval = ["data/eval"]          # held-out (test) data, evaluated at the end of training (default: none)
valid = ["data/valid"]        # validation data, evaluated every eval_every (trainer): picks the best checkpoint
                              # and drives early stopping (default: none; then eval_every evaluates [data].eval)
label = "label"               # label column: values must be 0 or 1 (default: "label", unless labels is given)
labels = ["click", "conversion"]  # multi-task (a model of recis.models.multitask): the label columns, one a
                              # task, in the order of the model's outputs; give label or labels, not both
                              # (default: none, one label). Each task is named by its column: the log and
                              # evaluation give loss_<task>, auc_<task>, log_loss_<task>...; auc, log_loss
                              # are the first task's. esmm: two, click then click AND conversion (its pCTCVR
                              # label, never 1 where click is 0: recis datagen --tasks 2's "conversion")
dense = ["I1", "I2"]          # numeric columns stacked into the model's dense input (default: none)
dense_transform = "none"      # "none" or "log1p" (log(1 + max(x, 0)), for counts); NaN/null reads as 0
non_finite = "error"          # ±inf in a float column (or a float64 dense value beyond float32's range):
                              # "error" (names the file, column and row), "clamp" (to ±3.4e38, float32's
                              # largest) or "zero"; NaN is a null (the reader cannot tell a stored NaN from
                              # one) and reads as 0
group = "user_id"             # integer column to group GAUC by (default: no GAUC)
vectors = ["item_vec"]        # list<float> columns of precomputed vectors (text or image embeddings), each
                              # [B, K] to the model, projected into one more field (default: none)
vector_widths = [64]          # K of each vectors column: every row holds K floats (else a named error)
batch_size = 4096
drop_remainder = false        # training drops each epoch's last batch when it is short (batch_norm needs a
                              # training batch of more than one row); evaluation never drops rows
shuffle = true                # seeded shuffle, per epoch, of the stripes and (shuffle_buffer) the rows
seed = 0
shuffle_buffer = 1048576      # with shuffle: rows are shuffled in windows of at least this many rows (whole
                              # stripes), across stripes and files; memory: one window of decoded rows (2^20 rows
                              # of 40 int64 columns: 336 MB); 0: shuffle the stripes only (with one stripe a file,
                              # every epoch sees the same batches). A checkpoint resumes only the same value
num_threads = 2               # ORC decoder threads
prefetch = 4                  # stripes decoded ahead

[model]
name = "deepfm"               # "deepfm", "dlrm", "dcnv2", "wide_deep"; a sequence model: "din" or "bst";
                              # multi-task ([data] labels): "shared_bottom", "mmoe" or "esmm"
dim = 16                      # embedding width
# further keys are the model's own arguments, e.g. hidden = [400, 400, 400]
# (deepfm, dcnv2, wide_deep), bottom / top (dlrm), cross_layers / rank (dcnv2),
# coalesce = false (every model: a physical table per feature table instead of
# one per config); shared_bottom: bottom, tower; mmoe: num_experts, expert,
# tower; esmm: ctr_tower, cvr_tower; shared_bottom and mmoe: num_tasks
# (default: the number of [data] labels, which it must equal); din: attention = [64, 32] (its attention
# MLP), hidden; bst: max_len = 50 (positions), blocks = 1, heads = 2 (dividing dim), feedforward = 64, hidden
target = "item"               # din, bst (required): the feature (its name) of the target item, pooled
history = "hist_items"        # din, bst (required): the feature of the history, combiner = "sequence"
                              # (give it and the target one shared table, so an item is one row in both)
dropout = 0.0                 # every model: dropout after each hidden MLP layer's activation (in [0, 1); 0: none;
                              # dlrm: its bottom and top MLPs; never the output layer); off in evaluation
batch_norm = false            # every model: BatchNorm1d after each hidden MLP layer's Linear, before its activation
                              # (evaluation uses the running statistics); a training batch of one row is an error:
                              # [data] drop_remainder = true drops a short last batch

[[feature]]                   # one per sparse field (at least one)
name = "C1"                   # the model's name for it
column = "C1"                 # ORC column (default: name): int64, list<int64>, or strings with hash = true
hash = false                  # hash strings to ids at read time (FarmHash Fingerprint64); a string column
                              # without it (or a float column) is refused when the job opens its data
bucket = 0                    # with hash: ids modulo bucket (0: none); bucket without hash is an error
columns = ["C1", "C2"]        # the columns the feature's ops read instead of column: two, for ops = cross
ops = [{ op = "fill_missing", value = 0 }, { op = "bucketize", boundaries = [1, 10, 100] }]
                              # an op chain from the column's values to the feature's ids, run fused over all
                              # features before the model (recis.features.chain): fill_missing {value},
                              # bucketize {boundaries}, hash {bucket}, mod {mod}, cross {bucket} (of the two
                              # columns, the first op), truncate {max_len, side}, multi_hash {buckets}; checked
                              # against the columns' types when the job opens its data (default: none)
combiner = "sum"              # "sum" or "mean" of a row's ids, or "sequence": the row's ids in order, for a
                              # sequence model's history ([model] history; the engine's combiner "tuple")
max_len = 0                   # with combiner = "sequence": keep the last N ids of each row (the newest, for
                              # a history written oldest first); 0: all
shared = "items"              # features naming the same shared table use one table (default: own table)
dim = 0                       # this feature's embedding width (0: [model].dim); another width is projected
                              # to [model].dim by the feature's own bias-free Linear (recis.models.common.
                              # FieldProjection; deepfm, wide_deep: dim + 1 to [model].dim + 1); features of
                              # one shared table have one dim
initializer = "normal"        # new rows: "normal" (Normal(0, init_std)), "truncated_normal" (cut at ±2
                              # init_std), "uniform" (U(-init_range, init_range)) or "zeros"; a function of
                              # (the table's seed, id); a table's seed is [data] seed + a hash of its name
                              # (its feature's, or its shared name), so adding or reordering features changes
                              # no other table's
init_std = 0.01               # normal, truncated_normal (the default is recis.nn.DEFAULT_INITIALIZER's, as in
                              # the Python API)
init_range = 0.05             # uniform
admit_after = 1               # an id gets a row at its k-th sighting (1: at once)
ttl_steps = 0                 # eviction: ids unseen for this many steps (0: never)
min_frequency = 0             # eviction: ids seen fewer times (0: none)
max_rows = 0                  # eviction: keep at most this many rows, LRU (0: no cap; features of one config
                              # share one physical table, which keeps features x max_rows, ranked together)
eviction_score = "lru"        # which rows max_rows keeps: "lru" (the most recently seen) or "lfu" (the most
                              # often seen)
min_l2_norm = 0.0             # eviction: rows whose embedding's L2 norm is below this (0: none)
eval_missing = "zeros"        # unknown ids in evaluation: "zeros" or "initial"

[feature_defaults]            # any [[feature]] field but name, column, columns, ops and shared: the value
init_std = 0.02               # of every feature that does not set it (default: none)

[optimizer]
dense = "adam"                # "adam", "adamw", "sgd" or "adagrad"
dense_lr = 0.001
dense_weight_decay = 0.0
sparse = "adam"               # "adam", "adamw", "adagrad", "rowwise_adagrad" or "sgd"
sparse_lr = 0.001
sparse_weight_decay = 0.0
dense_betas = [0.9, 0.999]    # adam/adamw only (default: the optimizer's own, as here)
dense_eps = 1e-8              # adam/adamw/adagrad only (default: the optimizer's own: 1e-8, adagrad 1e-10)
dense_momentum = 0.0          # sgd only
sparse_betas = [0.9, 0.999]   # adam/adamw only (default: as here)
sparse_eps = 1e-8             # adam/adamw/adagrad/rowwise_adagrad only (default: the optimizer's own: 1e-8,
                              # adagrad and rowwise_adagrad 1e-10)
schedule = "constant"         # the LR after warm-up, dense and sparse alike: "constant", "linear" or "cosine"
                              # (down to min_lr_ratio of the LR at the last step: max_steps, else epochs x the
                              # steps an epoch of [data].train takes)
warmup_steps = 0              # the LR rises linearly over the first N steps (step s: (s + 1) / N of it)
min_lr_ratio = 0.0            # linear/cosine: the LR at the end, a fraction of dense_lr/sparse_lr

[trainer]                     # recis.framework.TrainingArguments
output_dir = "runs/job"       # required: logs, checkpoints, curves
epochs = 1
max_steps = 0                 # 0: run the epochs
gradient_accumulation_steps = 1
mixed_precision = "none"      # "none", "bf16" or "fp16"
sparse_update = "auto"        # "auto", "in_backward" or "deferred": when the sparse optimizer updates
max_grad_norm = 0.0           # clip the gradients, dense and table rows together, to this L2 norm (0: never)
log_every_steps = 10
eval_every = 0                # validate (or, without [data].valid, evaluate) every N steps, or "epoch" (at
                              # each epoch's end); 0: only at the end
eval_every_steps = 0          # eval_every's older name (an int eval_every)
metric_for_best = "auc"       # the validation metric that picks the best checkpoint: "auc", "gauc" (needs
                              # [data].group) or "log_loss" (lower is better); multi-task: the first task's,
                              # or "auc_<task>", "gauc_<task>", "log_loss_<task>" (a task of [data].labels)
task_weights = [1.0, 0.5]     # multi-task: each task's weight in the loss (>= 0, one a [data].labels task;
                              # default: 1 each)
early_stopping_patience = 0   # stop when metric_for_best has not improved for N validations (0: never)
load_best_at_end = false      # at the end, load the best checkpoint's model before the final [data].eval
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
export_every_steps = 0        # serving exports every N steps into export_dir, a lineage (recis.serving): a
                              # full export first in each run, then deltas; `recis serve --export` follows it
export_dir = "runs/job/serving"  # default: output_dir/serving
export_precision = "fp32"     # the exported rows: "fp32", "fp16" or "int8"
```

Paths are relative to the config file's directory.

Numbers are checked when the config loads: batch_size, num_threads (at most
256), gradient_accumulation_steps, log_every_steps and keep_checkpoints are
>= 1; prefetch, seed and the other step counts >= 0; [model] dim >= 1.

`recis train` / `recis eval` take ``--set section.key=value`` (repeatable),
which sets a field after the file loads and before it is checked, as if the
file held it: the value is read as a TOML value (``trainer.epochs=3``,
``optimizer.dense="sgd"``, ``data.train=["a.orc"]``), and a bare word that
is not one (``optimizer.dense=sgd``) as a string. ``feature.NAME.key=value``
sets a field of the [[feature]] named NAME. Paths set so are, like the
file's, relative to the config file's directory. ``recis train
--print-config`` prints the config so resolved (every field, defaults
filled in, paths absolute) as TOML, and trains nothing.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import MISSING, dataclass, field, fields

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

from recis import distributed
from recis.io.dataset import NON_FINITE, SHUFFLE_BUFFER
from recis.nn.options import DEFAULT_INITIALIZER


class ConfigError(ValueError):
    """A bad config; the message names the file, section and field."""


@dataclass
class DataConfig:
    train: list[str]
    eval: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    label: str | None = None
    dense: list[str] = field(default_factory=list)
    dense_transform: str = "none"
    non_finite: str = "error"
    group: str | None = None
    vectors: list[str] = field(default_factory=list)
    vector_widths: list[int] = field(default_factory=list)
    batch_size: int = 4096
    drop_remainder: bool = False
    shuffle: bool = True
    seed: int = 0
    shuffle_buffer: int = SHUFFLE_BUFFER
    num_threads: int = 2
    prefetch: int = 4
    labels: list[str] | None = None


@dataclass
class FeatureConfig:
    name: str
    column: str | None = None
    hash: bool = False
    bucket: int = 0
    columns: list[str] = field(default_factory=list)
    ops: list[dict] = field(default_factory=list)
    combiner: str = "sum"
    max_len: int = 0
    shared: str | None = None
    dim: int = 0
    initializer: str = "normal"
    init_std: float = DEFAULT_INITIALIZER.std
    init_range: float = 0.05
    admit_after: int = 1
    ttl_steps: int = 0
    min_frequency: int = 0
    max_rows: int = 0
    eviction_score: str = "lru"
    min_l2_norm: float = 0.0
    eval_missing: str = "zeros"


@dataclass
class OptimizerConfig:
    dense: str = "adam"
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    sparse: str = "adam"
    sparse_lr: float = 1e-3
    sparse_weight_decay: float = 0.0
    dense_betas: list[float] | None = None
    dense_eps: float | None = None
    dense_momentum: float | None = None
    sparse_betas: list[float] | None = None
    sparse_eps: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    output_dir: str
    epochs: int = 1
    max_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "none"
    sparse_update: str = "auto"
    max_grad_norm: float = 0.0
    log_every_steps: int = 10
    eval_every: int | str = 0
    eval_every_steps: int = 0
    metric_for_best: str = "auc"
    early_stopping_patience: int = 0
    load_best_at_end: bool = False
    save_every_steps: int = 0
    keep_checkpoints: int = 3
    evict_every_steps: int = 0
    resume: bool = True
    resume_suspect: bool = False
    warm_start: str = ""
    warm_start_parts: list[str] = field(default_factory=lambda: ["sparse", "dense"])
    collective_timeout: float = 0.0
    export_every_steps: int = 0
    export_dir: str = ""
    export_precision: str = "fp32"
    task_weights: list[float] | None = None


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
            "int | str": isinstance(value, (int, str)) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "float | None": isinstance(value, (int, float)) and not isinstance(value, bool),
            "list[float] | None": isinstance(value, list)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
            "bool": isinstance(value, bool),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "list[int]": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
            "list[dict]": isinstance(value, list) and all(isinstance(v, dict) for v in value),
            "list[str] | None": isinstance(value, list) and all(isinstance(v, str) for v in value),
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


def _at_least(obj, names, low, where):
    """Each field of ``names`` of ``obj`` is >= ``low`` (the classes the job
    builds would refuse it later, in their own words)."""
    for k in names:
        if getattr(obj, k) < low:
            raise ConfigError(f"{where}.{k}: must be >= {low}, got {getattr(obj, k)}")


def _toml_value(text: str):
    """``text`` read as a TOML value; a bare word that is not one (``sgd``,
    ``runs/x``) is the string itself."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


def apply_overrides(raw: dict, overrides, path: str) -> None:
    """Sets each ``section.key=value`` (``feature.NAME.key=value``) of
    ``overrides`` in ``raw``, a config's TOML as parsed, before it is checked:
    an unknown section or field is then the error the file would get."""
    for text in overrides:
        key, eq, value = text.partition("=")
        section, _, rest = key.strip().partition(".")
        if not eq or not section or not rest:
            raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. trainer.epochs=3)")
        value = _toml_value(value.strip())
        if section == "feature":
            name, _, name_key = rest.rpartition(".")
            if not name or not name_key:
                raise ConfigError(f"--set {text!r}: a feature's field is set as feature.NAME.key=value")
            tables = raw.get("feature") if isinstance(raw.get("feature"), list) else []
            tables = [t for t in tables if isinstance(t, dict)]
            chosen = [t for t in tables if t.get("name") == name]
            if not chosen:
                known = [t.get("name") for t in tables]
                raise ConfigError(f"{path}: --set {key.strip()}: no [[feature]] is named {name!r} (known: {known})")
            for t in chosen:  # names are unique, or the check after says so
                t[name_key] = value
        else:
            if "." in rest:
                raise ConfigError(
                    f"--set {text!r}: [{section}]'s fields are one level deep: {section}.{rest.split('.')[0]}=value"
                )
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: --set {key.strip()}: [{section}] is not a table")
            table[rest] = value


def load_config(path: str, overrides=()) -> JobConfig:
    """Parses and checks a job config (see the module docstring).
    ``overrides``: ``section.key=value`` strings (``recis train --set``), set
    after the file is read and before it is checked."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    apply_overrides(raw, overrides, path)
    sections = {"data", "model", "feature", "feature_defaults", "optimizer", "trainer"}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} (known: {', '.join(sorted(sections))})")
    for section in ("data", "feature", "trainer"):
        if section not in raw:
            raise ConfigError(
                f"{path}: missing section [{section}]" if section != "feature" else f"{path}: no [[feature]]"
            )
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))  # noqa: E731
    data = _typed(DataConfig, raw["data"], f"{path}: [data]")
    data.train, data.eval = [rel(p) for p in data.train], [rel(p) for p in data.eval]
    data.valid = [rel(p) for p in data.valid]
    if not data.train:
        raise ConfigError(f"{path}: [data].train names no files")
    _check_labels(data, path)
    _one_of(data.dense_transform, ("none", "log1p"), f"{path}: [data].dense_transform")
    _one_of(data.non_finite, NON_FINITE, f"{path}: [data].non_finite")
    _at_least(data, ("batch_size", "num_threads"), 1, f"{path}: [data]")
    _at_least(data, ("prefetch", "seed"), 0, f"{path}: [data]")
    if data.num_threads > 256:
        raise ConfigError(f"{path}: [data].num_threads: must be <= 256, got {data.num_threads}")
    if len(data.vectors) != len(data.vector_widths):
        raise ConfigError(
            f"{path}: [data].vectors names {len(data.vectors)} column(s) and vector_widths gives "
            f"{len(data.vector_widths)} width(s): one width each"
        )
    if any(k < 1 for k in data.vector_widths):
        raise ConfigError(f"{path}: [data].vector_widths: each must be >= 1, got {data.vector_widths}")
    if data.shuffle_buffer < 0:
        raise ConfigError(f"{path}: [data].shuffle_buffer: must be >= 0 rows, got {data.shuffle_buffer}")
    if not isinstance(raw["feature"], list):
        raise ConfigError(f"{path}: features are [[feature]] tables (an array), not one [feature] table")
    defaults = raw.get("feature_defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [feature_defaults]: expected a table, got {type(defaults).__name__}")
    own = sorted(set(defaults) & {"name", "column", "columns", "ops", "shared"})
    if own:
        raise ConfigError(f"{path}: [feature_defaults]: {own} belong to each feature, not to every feature")
    _typed(FeatureConfig, {"name": "_", **defaults}, f"{path}: [feature_defaults]")
    features = []
    for i, t in enumerate(raw["feature"]):
        label = f" ({t['name']})" if isinstance(t, dict) and isinstance(t.get("name"), str) else ""
        if isinstance(t, dict):
            t = {**defaults, **t}
        features.append(_typed(FeatureConfig, t, f"{path}: [[feature]] #{i + 1}{label}"))
    names = [f.name for f in features]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: [[feature]] names repeated: {dup}")
    for i, f in enumerate(features):
        where = f"{path}: [[feature]] #{i + 1} ({f.name})"
        _one_of(f.combiner, ("sum", "mean", "sequence"), f"{where}.combiner")
        if f.max_len < 0:
            raise ConfigError(f"{where}.max_len: must be >= 0, got {f.max_len}")
        if f.max_len and f.combiner != "sequence":
            raise ConfigError(
                f'{where}.max_len: {f.max_len} with combiner = {f.combiner!r} (max_len cuts a combiner = "sequence" '
                'feature\'s rows): set combiner = "sequence", or remove max_len'
            )
        _one_of(f.eval_missing, ("zeros", "initial"), f"{where}.eval_missing")
        _one_of(f.initializer, INITIALIZERS, f"{where}.initializer")
        _one_of(f.eviction_score, ("lru", "lfu"), f"{where}.eviction_score")
        for k in ("init_std", "init_range", "min_l2_norm"):
            if not getattr(f, k) >= 0:
                raise ConfigError(f"{where}.{k}: must be >= 0, got {getattr(f, k)}")
        for k in ("bucket", "ttl_steps", "min_frequency", "max_rows"):
            if getattr(f, k) < 0:
                raise ConfigError(f"{where}.{k}: must be >= 0, got {getattr(f, k)}")
        if f.admit_after < 1:
            raise ConfigError(f"{where}.admit_after: must be >= 1, got {f.admit_after}")
        if f.dim < 0:
            raise ConfigError(f"{where}.dim: must be >= 1 (or 0: [model].dim), got {f.dim}")
        _check_ops(f, where)
        if f.bucket and not f.hash:
            raise ConfigError(
                f"{where}.bucket: {f.bucket} without hash = true (bucket bounds the ids hashed from strings; "
                "integer ids are used as they are): set hash = true, or remove bucket"
            )
    model = dict(raw.get("model", {}))
    from recis.models import ZOO

    model.setdefault("name", "deepfm")
    model.setdefault("dim", 16)
    _one_of(model["name"], sorted(ZOO), f"{path}: [model].name")
    dim = model["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ConfigError(f"{path}: [model].dim: expected an int >= 1, got {dim!r}")
    dims: dict[str, tuple[str, int]] = {}
    for f in features:
        if f.shared is None:
            continue
        d = f.dim or dim
        first = dims.setdefault(f.shared, (f.name, d))
        if first[1] != d:
            raise ConfigError(
                f"{path}: [[feature]] {f.name!r} and {first[0]!r} share the table {f.shared!r} but have dim "
                f"{d} and {first[1]}: one table has one dim"
            )
    _check_sequences(model, features, path)
    params = inspect.signature(ZOO[model["name"]]).parameters
    _check_tasks(model, params, data, path)
    allowed = set(params) - {"sparse_fields", "num_dense", "option", "seed", "vectors"}  # vectors: [data]
    unknown = sorted(set(model) - allowed - {"name"})
    if unknown:
        raise ConfigError(f"{path}: [model] unknown field(s) {unknown} for {model['name']} (known: {sorted(allowed)})")
    optimizer = _typed(OptimizerConfig, raw.get("optimizer", {}), f"{path}: [optimizer]")
    _one_of(optimizer.dense, DENSE_OPTIMIZERS, f"{path}: [optimizer].dense")
    _one_of(optimizer.sparse, SPARSE_OPTIMIZERS, f"{path}: [optimizer].sparse")
    _check_hyper(optimizer, path)
    trainer = _typed(TrainerConfig, raw["trainer"], f"{path}: [trainer]")
    trainer.output_dir = rel(trainer.output_dir)
    if trainer.warm_start:
        trainer.warm_start = rel(trainer.warm_start)
    _one_of(trainer.export_precision, ("fp32", "fp16", "int8"), f"{path}: [trainer].export_precision")
    if trainer.export_every_steps:
        trainer.export_dir = rel(trainer.export_dir or os.path.join(trainer.output_dir, "serving"))
    for part in trainer.warm_start_parts:
        _one_of(part, ("sparse", "dense", "optimizer"), f"{path}: [trainer].warm_start_parts")
    _one_of(trainer.mixed_precision, ("none", "bf16", "fp16"), f"{path}: [trainer].mixed_precision")
    _one_of(trainer.sparse_update, ("auto", "in_backward", "deferred"), f"{path}: [trainer].sparse_update")
    _at_least(trainer, ("gradient_accumulation_steps", "log_every_steps", "keep_checkpoints"), 1, f"{path}: [trainer]")
    _at_least(
        trainer,
        ("epochs", "max_steps", "eval_every_steps", "save_every_steps", "evict_every_steps", "export_every_steps"),
        0,
        f"{path}: [trainer]",
    )
    if trainer.sparse_update == "in_backward" and (
        trainer.gradient_accumulation_steps > 1 or trainer.mixed_precision == "fp16"
    ):
        raise ConfigError(
            f'{path}: [trainer].sparse_update: "in_backward" does not go with gradient_accumulation_steps > 1 or '
            'mixed_precision = "fp16" (they need the sparse gradient at the optimizer step): "auto" or "deferred"'
        )
    every = trainer.eval_every
    if isinstance(every, str) and every != "epoch" or isinstance(every, int) and every < 0:
        raise ConfigError(f'{path}: [trainer].eval_every: a number of steps >= 0 or "epoch", got {every!r}')
    if trainer.eval_every_steps:
        if every not in (0, trainer.eval_every_steps):
            raise ConfigError(
                f"{path}: [trainer].eval_every = {every!r} and eval_every_steps = {trainer.eval_every_steps} "
                "disagree (eval_every_steps is eval_every's older name): give one"
            )
        trainer.eval_every = trainer.eval_every_steps
    trainer.eval_every_steps = 0
    from recis.framework.trainer import best_metrics, metric_base

    _one_of(trainer.metric_for_best, best_metrics(data.labels), f"{path}: [trainer].metric_for_best")
    if metric_base(trainer.metric_for_best, data.labels) == "gauc" and not data.group:
        raise ConfigError(
            f'{path}: [trainer].metric_for_best = "{trainer.metric_for_best}" needs [data].group (the column to group '
            "by)"
        )
    _check_task_weights(trainer, data, path)
    _at_least(trainer, ("early_stopping_patience",), 0, f"{path}: [trainer]")
    if (trainer.early_stopping_patience or trainer.load_best_at_end) and not data.valid:
        which = "early_stopping_patience" if trainer.early_stopping_patience else "load_best_at_end"
        raise ConfigError(
            f"{path}: [trainer].{which} needs a validation set, [data].valid ([data].eval is the held-out test "
            "data, not data to choose a model by)"
        )
    if trainer.early_stopping_patience and not trainer.eval_every:
        raise ConfigError(
            f'{path}: [trainer].early_stopping_patience needs a periodic validation: eval_every (steps, or "epoch")'
        )
    if trainer.max_grad_norm < 0:
        raise ConfigError(f"{path}: [trainer].max_grad_norm: must be >= 0 (0: none), got {trainer.max_grad_norm}")
    if trainer.max_grad_norm and trainer.sparse_update == "in_backward":
        raise ConfigError(
            f'{path}: [trainer].sparse_update: "in_backward" does not go with max_grad_norm (clipping needs the '
            'sparse gradient at the optimizer step): "auto" or "deferred"'
        )
    if optimizer.schedule != "constant" and not trainer.max_steps and not trainer.epochs:
        raise ConfigError(f"{path}: [optimizer].schedule {optimizer.schedule!r} needs [trainer].max_steps or epochs")
    if trainer.collective_timeout < 0:
        raise ConfigError(
            f"{path}: [trainer].collective_timeout: must be >= 0 seconds, got {trainer.collective_timeout}"
        )
    return JobConfig(path, data, features, model, optimizer, trainer)


def _check_ops(f: FeatureConfig, where: str) -> None:
    """A feature's ops and columns, checked for shape and arguments (their
    types are checked against the data when the job opens it)."""
    from recis.features.chain import build_ops, validate
    from recis.features.ops import FeatureOpError

    if f.columns and not f.ops:
        raise ConfigError(f"{where}.columns: given without ops (columns are what the ops read; one column: column)")
    if f.columns and f.column:
        raise ConfigError(f"{where}: give column or columns, not both")
    if len(f.columns) > 2:
        raise ConfigError(f"{where}.columns: at most two (for cross), got {f.columns}")
    if f.ops and f.bucket:
        raise ConfigError(
            f'{where}.bucket: not with ops: end the chain with {{op = "mod", mod = {f.bucket}}} (or hash\'s bucket)'
        )
    if not f.ops:
        return
    try:
        f.ops = validate(f.ops, f.name, len(f.columns) or 1)
        build_ops(f.ops, f.name)
    except FeatureOpError as e:
        raise ConfigError(f"{where}.ops: {e}") from None


INITIALIZERS = ("normal", "truncated_normal", "uniform", "zeros")


def _initializer(f: FeatureConfig):
    from recis.nn import ConstantInit, NormalInit, TruncatedNormalInit, UniformInit

    mean = DEFAULT_INITIALIZER.mean
    if f.initializer == "normal":
        return NormalInit(mean, f.init_std)
    if f.initializer == "truncated_normal":
        return TruncatedNormalInit(mean, f.init_std, mean - 2 * f.init_std, mean + 2 * f.init_std)
    if f.initializer == "uniform":
        return UniformInit(-f.init_range, f.init_range)
    return ConstantInit(0.0)


def _check_labels(data: DataConfig, path: str) -> None:
    """[data] label or labels (not both); label defaults to "label"."""
    if data.labels is None:
        if data.label is None:
            data.label = "label"
        return
    if data.label is not None:
        raise ConfigError(
            f"{path}: [data]: label = {data.label!r} and labels = {data.labels!r}: give one (labels, for a "
            "multi-task model, names every task's label column; label, one)"
        )
    labels = data.labels
    if not labels or not all(labels) or len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: [data].labels: distinct column names, at least one, got {labels!r}")
    if "scale" in labels:
        raise ConfigError(f'{path}: [data].labels: a task may not be named "scale" (loss_scale is logged)')


def _check_tasks(model: dict, params, data: DataConfig, path: str) -> None:
    """A multi-task model with [data].labels, one label a task; a
    single-task model with [data].label. Fills in num_tasks."""
    from recis.models import ZOO, is_multitask

    name = model["name"]
    if not is_multitask(ZOO[name]):
        if data.labels is not None:
            raise ConfigError(
                f"{path}: [data].labels names {len(data.labels)} tasks but [model].name = {name!r} is single-task "
                '(one logit a row): use label = "...", or a multi-task model (shared_bottom, mmoe, esmm)'
            )
        return
    if data.labels is None:
        raise ConfigError(
            f"{path}: [model].name = {name!r} is multi-task: it needs [data].labels, the label column of each task "
            '(e.g. labels = ["label", "conversion"])'
        )
    n = len(data.labels)
    if "num_tasks" in params:
        tasks = model.setdefault("num_tasks", n)
        if tasks != n:
            raise ConfigError(f"{path}: [model].num_tasks = {tasks!r} but [data].labels names {n}: {data.labels}")
    elif n != 2:  # esmm
        raise ConfigError(
            f"{path}: [model].name = {name!r} has 2 tasks (pCTR, pCTCVR): [data].labels must name 2 columns (click, "
            f"then click AND conversion), got {data.labels}"
        )


def _check_task_weights(trainer: TrainerConfig, data: DataConfig, path: str) -> None:
    w = trainer.task_weights
    if w is None:
        return
    if data.labels is None:
        raise ConfigError(f"{path}: [trainer].task_weights needs [data].labels (a weight for each task's label)")
    if len(w) != len(data.labels):
        raise ConfigError(
            f"{path}: [trainer].task_weights has {len(w)} weights but [data].labels names {len(data.labels)} tasks "
            f"{data.labels}: one a task"
        )
    if not all(x >= 0 for x in w) or not any(w):
        raise ConfigError(f"{path}: [trainer].task_weights: numbers >= 0, not all 0, got {w}")


def _check_sequences(model: dict, features: list[FeatureConfig], path: str) -> None:
    """A sequence model's ``target`` and ``history`` name [[feature]]s, the
    history's combiner "sequence" and the target's not; a "sequence"
    feature is only a sequence model's history."""
    from recis.models import SEQUENCE_MODELS

    by_name = {f.name: f for f in features}
    sequences = [f.name for f in features if f.combiner == "sequence"]
    name = model["name"]
    if name not in SEQUENCE_MODELS:
        if sequences:
            raise ConfigError(
                f'{path}: [[feature]] {sequences}: combiner = "sequence" is a sequence model\'s history, and '
                f'{name} pools every feature: [model] name = one of {SEQUENCE_MODELS}, or combiner "sum"/"mean"'
            )
        return
    for arg in ("target", "history"):
        if arg not in model:
            raise ConfigError(f"{path}: [model] ({name}): {arg} is required: the [[feature]] of the {arg}")
        if model[arg] not in by_name:
            raise ConfigError(f"{path}: [model].{arg}: {model[arg]!r} is not a [[feature]] (known: {list(by_name)})")
    if by_name[model["history"]].combiner != "sequence":
        raise ConfigError(
            f'{path}: [model].history: [[feature]] {model["history"]!r} needs combiner = "sequence", got '
            f"{by_name[model['history']].combiner!r}"
        )
    if by_name[model["target"]].combiner == "sequence":
        raise ConfigError(
            f'{path}: [model].target: [[feature]] {model["target"]!r} is pooled ("sum" or "mean"), not "sequence"'
        )
    others = [n for n in sequences if n != model["history"]]
    if others:
        raise ConfigError(
            f'{path}: [[feature]] {others}: combiner = "sequence", but {name} reads one history, '
            f"[model].history = {model['history']!r}"
        )


# Which optimizers take which [optimizer] hyper-parameter.
_HYPER = {
    "betas": ("adam", "adamw"),
    "eps": ("adam", "adamw", "adagrad", "rowwise_adagrad"),
    "momentum": ("sgd",),
}


def _check_hyper(o: OptimizerConfig, path: str) -> None:
    for side in ("dense", "sparse"):
        kind = getattr(o, side)
        for name, takers in _HYPER.items():
            value = getattr(o, f"{side}_{name}", None)
            if value is None:
                continue
            where = f"{path}: [optimizer].{side}_{name}"
            if kind not in takers:
                raise ConfigError(f"{where}: {side} = {kind!r} takes no {name} (only {', '.join(takers)} do)")
            if name == "betas" and (len(value) != 2 or not all(0.0 <= b < 1.0 for b in value)):
                raise ConfigError(f"{where}: two numbers in [0, 1), got {value}")
            if name == "eps" and not value > 0:
                raise ConfigError(f"{where}: must be > 0, got {value}")
            if name == "momentum" and not 0.0 <= value < 1.0:
                raise ConfigError(f"{where}: must be in [0, 1), got {value}")
    _one_of(o.schedule, ("constant", "linear", "cosine"), f"{path}: [optimizer].schedule")
    if o.warmup_steps < 0:
        raise ConfigError(f"{path}: [optimizer].warmup_steps: must be >= 0, got {o.warmup_steps}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"{path}: [optimizer].min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")


def _hyper_kwargs(o: OptimizerConfig, side: str) -> dict:
    out = {}
    for name in _HYPER:
        value = getattr(o, f"{side}_{name}", None)
        if value is not None:
            out[name] = tuple(value) if name == "betas" else value
    return out


def model_arguments(model: dict) -> dict:
    """``[model]`` with the model's own defaults filled in (tuples as lists;
    a ``None`` default, e.g. dcnv2's rank, stays None: unset)."""
    from recis.models import ZOO

    out = dict(model)
    for name, p in inspect.signature(ZOO[model["name"]]).parameters.items():
        if name in ("sparse_fields", "num_dense", "option", "seed", "vectors") or p.default is inspect.Parameter.empty:
            continue
        if name not in out:
            out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def _toml(value) -> str:
    """``value`` (a config's: str, bool, int, float, list, table) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's float repr (1e-05, inf, nan) is TOML's
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch in "\n\t":
                out.append("\\n" if ch == "\n" else "\\t")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):  # a TOML date or time read from the file
        return value.isoformat()
    raise TypeError(f"no TOML for {value!r}")


def _toml_key(key: str) -> str:
    bare = key and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in key)
    return key if bare else _toml(key)


def dump_config(cfg: JobConfig, overrides=()) -> str:
    """``cfg`` as a TOML config (``recis train --print-config``): every field,
    defaults filled in, paths absolute; loading it gives ``cfg`` again. A
    field that is unset (no default value) is a comment."""

    def table(header, pairs):
        lines = [header]
        for k, v in pairs:
            lines.append(f"# {k}: not set" if v is None else f"{_toml_key(k)} = {_toml(v)}")
        return lines

    def of(obj):
        return [(f.name, getattr(obj, f.name)) for f in fields(obj)]

    head = f"# {cfg.path}" + (f", with --set {' '.join(overrides)}" if overrides else "") + ": resolved"
    lines = [head, ""]
    lines += table("[data]", of(cfg.data)) + [""]
    lines += table("[model]", model_arguments(cfg.model).items()) + [""]
    for f in cfg.features:
        pairs = [(k, (f.name if k == "column" and v is None else v)) for k, v in of(f)]
        lines += table("[[feature]]", pairs) + [""]
    lines += table("[optimizer]", of(cfg.optimizer)) + [""]
    lines += table("[trainer]", of(cfg.trainer))
    return "\n".join(lines) + "\n"


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
        from recis.io import OrcDataset
        from recis.io.pipeline import FeatureInput, InputPipeline
        from recis.models import ZOO
        from recis.nn import AlwaysAdmit, CountAdmit, EmbeddingOption, EvictionOption
        from recis.nn.options import name_seed

        self.cfg = cfg
        d, t, o = cfg.data, cfg.trainer, cfg.optimizer
        self.pipeline = InputPipeline(
            features=[
                FeatureInput(
                    f.name,
                    f.column or (f.columns[0] if f.columns else f.name),
                    f.hash,
                    f.bucket,
                    columns=tuple(f.columns) if len(f.columns) > 1 else (),
                    ops=tuple(f.ops),
                    max_len=f.max_len,
                )
                for f in cfg.features
            ],
            label=(d.label or "label") if d.labels is None else d.labels[0],
            labels=d.labels,
            dense=list(d.dense),
            dense_transform=d.dense_transform,
            non_finite=d.non_finite,
            group=d.group,
            vectors=[[c, k] for c, k in zip(d.vectors, d.vector_widths, strict=True)],
            where=cfg.path,
        )
        try:
            columns = self.pipeline.columns()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        kw = dict(
            batch_size=d.batch_size,
            columns=columns,
            num_threads=d.num_threads,
            prefetch=d.prefetch,
            non_finite=d.non_finite,
        )
        self.train_dataset = (
            OrcDataset(
                d.train,
                shuffle=d.shuffle,
                seed=d.seed,
                shuffle_buffer=d.shuffle_buffer,
                drop_remainder=d.drop_remainder,
                **kw,
            )
            if for_training
            else None
        )
        self.eval_dataset = OrcDataset(d.eval, **kw) if d.eval else None
        self.valid_dataset = OrcDataset(d.valid, **kw) if d.valid and for_training else None
        for ds in (self.train_dataset, self.eval_dataset, self.valid_dataset):
            if ds is not None:
                self._check_feature_columns(ds)
        cls = ZOO[cfg.model["name"]]
        dim = cfg.model["dim"]
        width = dim + getattr(cls, "extra_width", 0)
        options = {}
        for f in cfg.features:
            eviction = None
            if f.ttl_steps or f.min_frequency or f.max_rows or f.min_l2_norm:
                eviction = EvictionOption(
                    ttl_steps=f.ttl_steps or None,
                    min_frequency=f.min_frequency or None,
                    max_rows=f.max_rows or None,
                    score=f.eviction_score,
                    min_l2_norm=f.min_l2_norm or None,
                )
            options[f.name] = EmbeddingOption(
                dim=(f.dim or dim) + (width - dim),
                initializer=_initializer(f),
                combiner="tuple" if f.combiner == "sequence" else f.combiner,
                admission=CountAdmit(f.admit_after) if f.admit_after > 1 else AlwaysAdmit(),
                eviction=eviction,
                shared_name=f.shared,
                seed=name_seed(d.seed, f.shared or f.name),
                eval_missing=f.eval_missing,
            )
        kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        if d.vectors:
            kwargs["vectors"] = [[c, k] for c, k in zip(d.vectors, d.vector_widths, strict=True)]
        torch.manual_seed(d.seed)
        try:
            self.model = cls(options, num_dense=len(d.dense), seed=d.seed, **kwargs)
        except (TypeError, ValueError) as e:
            # [model]'s fields beyond name and dim are the model's own
            # arguments, checked by it alone.
            raise ConfigError(f"{cfg.path}: [model] ({cfg.model['name']}): {e}") from e
        self.dense_optimizer = DENSE_OPTIMIZERS[o.dense](
            self.model.parameters(), lr=o.dense_lr, weight_decay=o.dense_weight_decay, **_hyper_kwargs(o, "dense")
        )
        sparse_cls = {
            "adam": optim.SparseAdam,
            "adamw": optim.SparseAdamW,
            "adagrad": optim.SparseAdagrad,
            "rowwise_adagrad": optim.SparseRowWiseAdagrad,
            "sgd": optim.SparseSGD,
        }[o.sparse]
        self.sparse_optimizer = sparse_cls(
            self.model, lr=o.sparse_lr, weight_decay=o.sparse_weight_decay, **_hyper_kwargs(o, "sparse")
        )
        schedulers = None
        if o.schedule != "constant" or o.warmup_steps:
            from recis.optim import warmup_schedule

            total = t.max_steps
            if not total and self.train_dataset is not None:
                per_epoch = -(-self.train_dataset.total_rows() // (d.batch_size * distributed.world()))
                total = t.epochs * max(1, per_epoch // t.gradient_accumulation_steps)
            total = max(total or 0, o.warmup_steps + 1)
            schedulers = [
                warmup_schedule(opt, o.warmup_steps, o.schedule, total, o.min_lr_ratio)
                for opt in (self.dense_optimizer, self.sparse_optimizer)
            ]
        self.args = TrainingArguments(
            output_dir=t.output_dir,
            epochs=t.epochs,
            max_steps=t.max_steps or None,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=None if t.mixed_precision == "none" else t.mixed_precision,
            sparse_update=t.sparse_update,
            max_grad_norm=t.max_grad_norm or None,
            log_every_steps=t.log_every_steps,
            eval_every=t.eval_every or None,
            metric_for_best=t.metric_for_best,
            # Validation is training's (recis eval has no validation set).
            early_stopping_patience=t.early_stopping_patience if for_training else 0,
            load_best_at_end=t.load_best_at_end and for_training,
            save_every_steps=t.save_every_steps or None,
            keep_checkpoints=t.keep_checkpoints,
            evict_every_steps=t.evict_every_steps or None,
            resume=t.resume,
            resume_suspect=t.resume_suspect,
            warm_start=t.warm_start or None,
            warm_start_parts=tuple(t.warm_start_parts),
            collective_timeout=t.collective_timeout or None,
            label_key=(d.label or "label") if d.labels is None else d.labels[0],
            group_key=d.group,
            label_keys=d.labels,
            task_weights=t.task_weights,
        )
        self.trainer = Trainer(
            self.model,
            self.args,
            self.train_dataset,
            self.eval_dataset,
            dense_optimizer=self.dense_optimizer,
            sparse_optimizer=self.sparse_optimizer,
            input_fn=self.pipeline,
            valid_dataset=self.valid_dataset,
            lr_scheduler=schedulers,
        )
        if t.export_every_steps:
            from recis.serving import ServingExportHook

            self.trainer.hooks.append(
                ServingExportHook(t.export_dir, t.export_every_steps, precision=t.export_precision)
            )

    def _check_feature_columns(self, ds) -> None:
        """Every feature's column holds integer ids (or strings it hashes), so
        that a string or float column is refused here, naming the feature,
        before any step, rather than by the model at the first one. The
        reader has checked that every file gives a column one type."""
        from recis.features.chain import check_chain, column_kind
        from recis.features.ops import FeatureOpError

        types = {name: (dtype, is_list) for name, dtype, is_list, _ in ds.types}
        for c in self.cfg.data.vectors:
            dtype, is_list = types[c]
            if not (is_list and dtype in ("float32", "float64")):
                kind = f"list<{dtype}>" if is_list else dtype
                raise ConfigError(
                    f"{self.cfg.path}: [data].vectors column {c!r} of {ds.files[0]} is {kind}, and a vector column "
                    "is list<float> (K floats a row)"
                )
        for f in self.cfg.features:
            if f.ops:
                cols = f.columns or [f.column or f.name]
                inputs = [(c, column_kind(*types[c], hashed=f.hash and types[c][0] == "string")) for c in cols]
                try:
                    check_chain(f.ops, f.name, inputs)
                except FeatureOpError as e:
                    raise ConfigError(f"{self.cfg.path}: [[feature]] {f.name!r}: on {ds.files[0]}: {e}") from None
                continue
            col = f.column or f.name
            dtype, is_list = types[col]
            if dtype == "int64":
                continue
            kind = f"list<{dtype}>" if is_list else dtype
            where = f"{self.cfg.path}: [[feature]] {f.name!r}: column {col!r} of {ds.files[0]} is {kind}"
            if dtype == "string":
                raise ConfigError(
                    f"{where}, and a feature takes integer ids: set hash = true to hash the strings to ids"
                )
            raise ConfigError(
                f"{where}, and a feature takes integer ids: write the column as int64 (or as strings, with "
                "hash = true), or read it as a [data] dense column"
            )

    def input_fn(self, batch: dict) -> dict:
        """A reader batch as model input (``recis.io.pipeline.InputPipeline``)."""
        return self.pipeline(batch)
