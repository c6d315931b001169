"""`Trainer`: the training and evaluation loops around a model with dynamic
embeddings.

It owns the loop (gradient accumulation, mixed precision, logging, periodic
evaluation and eviction, checkpoints and resume); the model, the data and
the optimizers are the user's. The model maps a batch (after ``input_fn``) to
logits [B]; the loss is binary cross-entropy against ``batch[label_key]``
unless ``loss_fn`` says otherwise.

Multi-task (``TrainingArguments.label_keys``, T label columns, one a task):
the model maps a batch to logits [B, T], column t the task of
``label_keys[t]`` (``recis.models.multitask``); the loss is the sum over the
tasks of ``task_weights[t]`` times the task's binary cross-entropy (each
task's is logged as ``loss_<task>``), and evaluation gives every metric per
task (``auc_<task>``, ``log_loss_<task>``, ``calibration_<task>``,
``gauc_<task>``; a task is named by its label column) and, under the plain
names (``auc``, ``log_loss``...), the first task's, which is what
``metric_for_best`` "auc" and the rest of the code read. ESMM: the tasks are
pCTR and pCTCVR, the label columns click and click AND conversion (see
``recis.models.multitask``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from recis import distributed
from recis.framework.checkpoint import CheckpointManager, suspect
from recis.framework.curves import TensorBoardLog, plot_curves, wanted
from recis.framework.lock import OutputDirLock, OutputDirLocked, holder
from recis.framework.scaler import DynamicLossScaler
from recis.io.pipeline import InputPipeline
from recis.metrics import AUROC, GAUC, Calibration, LogLoss
from recis.models.common import model_spec
from recis.optim.sparse import collect_tables
from recis.ragged import batch_rows

# metric_for_best's choices: whether higher values are better.
BEST_METRICS = {"auc": True, "gauc": True, "log_loss": False}


def best_metrics(label_keys=None) -> dict[str, bool]:
    """metric_for_best's choices, with whether higher is better: those of
    ``BEST_METRICS`` and, for a multi-task job, each of them per task
    (``auc_<task>``...). The plain names are the first task's."""
    out = dict(BEST_METRICS)
    for task in label_keys or ():
        for name, higher in BEST_METRICS.items():
            out[f"{name}_{task}"] = higher
    return out


def metric_base(metric: str, label_keys=None) -> str:
    """The ``BEST_METRICS`` name a metric_for_best choice is of (``auc_click``:
    ``auc``)."""
    for task in label_keys or ():
        for name in BEST_METRICS:
            if metric == f"{name}_{task}":
                return name
    return metric


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why
    and which checkpoint is the last good one."""


@dataclass
class TrainingArguments:
    """How to train. Fields:

    output_dir: logs (``log.jsonl``) and checkpoints (``checkpoints/``) go here.
        A run holds its lock (``output_dir/.lock``, ``recis.framework.lock``)
        while it trains or saves: a second run there is refused, naming the
        holder's pid.
    epochs: passes over the training data (ignored when ``max_steps`` is set).
    max_steps: stop after this many optimizer steps.
    gradient_accumulation_steps: micro-batches summed into one optimizer step
        (dense and sparse); the loss of each is divided by this.
    mixed_precision: None, "bf16" or "fp16" (``torch.autocast``; the tables
        and their gradients stay float32). fp16 adds dynamic loss scaling of
        dense and sparse gradients (``recis.framework.scaler``): a step with
        an inf/NaN gradient is skipped and the scale halves.
    max_grad_norm: clip the gradients before each optimizer step so that
        their joint L2 norm, dense parameters and table rows together, is at
        most this (``recis.optim.clip_grad_norm_``; the sparse update then
        runs at the step, not in backward); the norm before clipping is
        logged as ``grad_norm``. None: no clipping.
    log_every_steps: progress line and log record every this many steps.
    eval_every: evaluate periodically: every this many steps (an int), or
        ``"epoch"`` (at the end of each epoch); None: only at the end of
        training. Periodic evaluation runs on the Trainer's
        ``valid_dataset`` when it has one (a validation: it picks the best
        checkpoint and drives early stopping; ``eval_dataset``, the
        held-out test set, is then evaluated at the end only), else on
        ``eval_dataset`` (as before validation sets existed). Either is
        evaluated at the end of training too, unless it just was.
    eval_every_steps: the older name of an int ``eval_every`` (kept). After
        construction it mirrors ``eval_every`` (None when that is "epoch");
        given both, they must agree.
    metric_for_best: the validation metric that picks the best checkpoint
        and drives early stopping: "auc" (higher is better), "gauc" (higher
        is better; needs ``group_key``) or "log_loss" (lower is better); with
        ``label_keys``, these are the first task's, and "auc_<task>",
        "gauc_<task>" or "log_loss_<task>" choose another task's (its label
        column). A validation improves on the best when strictly better (a
        NaN never does).
    early_stopping_patience: stop training when ``metric_for_best`` has not
        improved for this many validations in a row (0: never stop early).
        Needs a ``valid_dataset`` and a periodic ``eval_every``. The run
        prints that it stopped and logs an ``early_stopping`` record; a run
        resumed after that trains no further (unless given more patience).
    load_best_at_end: at the end of training (after the last checkpoint is
        saved, which stays the exact resume point), load the best
        checkpoint's tables and dense weights into the model, so that the
        final evaluation on ``eval_dataset`` and the model ``train()``
        leaves are the best one's (needs a ``valid_dataset``).
    save_every_steps: checkpoint every this many steps (and at the end).
    keep_checkpoints: keep the last this many, and, with a
        ``valid_dataset``, the best one (by ``metric_for_best``) whatever
        its age: the ``best`` pointer names it (``recis.framework.checkpoint``).
    evict_every_steps: run each table's ``EmbeddingOption.eviction`` policy.
    resume: start from the latest checkpoint in ``output_dir`` if there is one.
    resume_suspect: resume from the newest checkpoint even when it is
        suspect (it saved a NaN or an infinity). False: the suspect ones newer
        than the last good checkpoint are set aside (renamed
        ``ckpt-<step>.suspect``, kept for a look) and the run resumes from the
        last good one, since resuming from a suspect one meets its non-finite
        values again; if every checkpoint is suspect, the run stops naming
        them, with nothing changed.
    warm_start: a checkpoint (a ``ckpt-N`` directory, or a checkpoints
        directory: its latest) to start from when ``output_dir`` has none to
        resume: its ``warm_start_parts`` are loaded and training starts at
        step 0 (e.g. a model trained on older data, or a checkpoint of
        another world size: tables are re-sharded).
    warm_start_parts: of "sparse", "dense", "optimizer" (without
        "optimizer", tables keep the saved embeddings and start their
        optimizer slots afresh).
    label_key / group_key: batch keys of the label and of the GAUC group.
    label_keys: multi-task: the batch keys of the tasks' labels, one a
        task, in the order of the model's logit columns ([B, T]); each task
        is named by its label key (``loss_<task>``, ``auc_<task>``...).
        ``label_key`` then is the first of them (it must be left as the
        default or be that one). None: one task, ``label_key``, exactly as
        before multi-task training existed.
    task_weights: the weight of each task's loss in the loss the Trainer
        minimises (numbers >= 0, not all 0, one a task; needs
        ``label_keys``). None: 1 each.
    tensorboard: TensorBoard event files in ``output_dir/tensorboard`` (None:
        if the ``tensorboard`` package is installed).
    plot: a PNG of the loss and AUC curves, ``output_dir/curves.png``, at the
        end (None: if ``matplotlib`` is installed).
    progress: a progress line per log step on stdout.
    sparse_update: when the sparse optimizer updates the tables: "auto"
        (the optimizer's own ``in_backward`` if it was given one; else
        inside backward when nothing needs the sparse gradient in between:
        no gradient accumulation and no fp16 loss scaling; else at the
        optimizer step), "in_backward" or "deferred" (``SparseOptimizer.in_backward``).
    collective_timeout: under torchrun, seconds without a heartbeat from a
        rank (or inside one collective) after which every rank exits with
        status 3 (``recis.distributed.watchdog.EXIT_HUNG``), naming the
        silent rank and its step (None: the timeout ``init_from_env`` gave
        the process group, else ``recis.distributed.collective_timeout()``). It must exceed the longest
        a rank spends between collectives (a checkpoint save, evaluation).
    """

    output_dir: str
    epochs: int = 1
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    max_grad_norm: float | None = None
    log_every_steps: int = 10
    eval_every: int | str | None = None
    eval_every_steps: int | None = None
    metric_for_best: str = "auc"
    early_stopping_patience: int = 0
    load_best_at_end: bool = False
    save_every_steps: int | None = None
    keep_checkpoints: int = 3
    evict_every_steps: int | None = None
    resume: bool = True
    resume_suspect: bool = False
    warm_start: str | None = None
    warm_start_parts: tuple[str, ...] = ("sparse", "dense")
    label_key: str = "label"
    group_key: str | None = None
    tensorboard: bool | None = None
    plot: bool | None = None
    progress: bool = True
    sparse_update: str = "auto"
    collective_timeout: float | None = None
    label_keys: list[str] | None = None
    task_weights: list[float] | None = None

    def __post_init__(self):
        self._check_tasks()
        if self.sparse_update not in ("auto", "in_backward", "deferred"):
            raise ValueError(
                "TrainingArguments.sparse_update must be 'auto', 'in_backward' or 'deferred', "
                f"got {self.sparse_update!r}"
            )
        if self.gradient_accumulation_steps < 1:
            raise ValueError("TrainingArguments.gradient_accumulation_steps must be >= 1")
        if self.mixed_precision not in (None, "bf16", "fp16"):
            raise ValueError(
                f"TrainingArguments.mixed_precision must be None, 'bf16' or 'fp16', got {self.mixed_precision!r}"
            )
        m = self.max_grad_norm
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise ValueError(f"TrainingArguments.max_grad_norm must be a number > 0 or None, got {m!r}")
        if self.collective_timeout is not None and not self.collective_timeout > 0:
            raise ValueError(f"TrainingArguments.collective_timeout must be > 0 or None, got {self.collective_timeout}")
        for name in ("log_every_steps", "eval_every_steps", "save_every_steps", "evict_every_steps", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"TrainingArguments.{name} must be >= 1 or None, got {v}")
        every = self.eval_every
        steps = isinstance(every, int) and not isinstance(every, bool) and every >= 1
        ok = every is None or every == "epoch" or steps
        if not ok:
            raise ValueError(f"TrainingArguments.eval_every must be an int >= 1, 'epoch' or None, got {every!r}")
        if self.eval_every_steps is not None:
            if every is not None and every != self.eval_every_steps:
                raise ValueError(
                    f"TrainingArguments: eval_every={every!r} and eval_every_steps={self.eval_every_steps!r} "
                    "disagree (eval_every_steps is the older name of an int eval_every): give one"
                )
            self.eval_every = self.eval_every_steps
        self.eval_every_steps = self.eval_every if isinstance(self.eval_every, int) else None
        choices = best_metrics(self.label_keys)
        if self.metric_for_best not in choices:
            raise ValueError(
                f"TrainingArguments.metric_for_best must be one of {list(choices)}, got {self.metric_for_best!r}"
            )
        if metric_base(self.metric_for_best, self.label_keys) == "gauc" and not self.group_key:
            raise ValueError(
                f"TrainingArguments.metric_for_best={self.metric_for_best!r} needs group_key (the column GAUC "
                "groups by)"
            )
        p = self.early_stopping_patience
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"TrainingArguments.early_stopping_patience must be an int >= 0, got {p!r}")
        if p and self.eval_every is None:
            raise ValueError(
                "TrainingArguments.early_stopping_patience needs a periodic validation: set eval_every (steps, or "
                "'epoch')"
            )
        self.warm_start_parts = tuple(self.warm_start_parts)
        bad = sorted(set(self.warm_start_parts) - {"sparse", "dense", "optimizer"})
        if bad or not self.warm_start_parts:
            raise ValueError(
                f"TrainingArguments.warm_start_parts: {bad or 'none given'}; choose from 'sparse', 'dense', 'optimizer'"
            )

    def _check_tasks(self) -> None:
        keys, weights = self.label_keys, self.task_weights
        if keys is None:
            if weights is not None:
                raise ValueError("TrainingArguments.task_weights needs label_keys (a weight for each task's label)")
            return
        if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"TrainingArguments.label_keys must be a list of label column names, got {keys!r}")
        keys = list(keys)
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"TrainingArguments.label_keys must name distinct columns, at least one, got {keys!r}")
        if "scale" in keys:
            raise ValueError('TrainingArguments.label_keys: a task may not be named "scale" (loss_scale is logged)')
        if self.label_key not in ("label", keys[0]):
            raise ValueError(
                f"TrainingArguments: label_key={self.label_key!r} and label_keys={keys!r}: with label_keys, label_key "
                "is its first (give one of them)"
            )
        self.label_keys, self.label_key = keys, keys[0]
        if weights is None:
            return
        ok = not isinstance(weights, str) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
        )
        if not ok:
            raise ValueError(f"TrainingArguments.task_weights must be numbers >= 0, got {weights!r}")
        weights = [float(w) for w in weights]
        if len(weights) != len(keys):
            raise ValueError(
                f"TrainingArguments.task_weights has {len(weights)} weights for {len(keys)} tasks {keys}: one a task"
            )
        if not any(weights):
            raise ValueError("TrainingArguments.task_weights are all 0: nothing would be trained")
        self.task_weights = weights

    @property
    def tasks(self) -> list[str] | None:
        """The multi-task job's task names (its label keys); None: single-task."""
        return self.label_keys


class Trainer:
    """Trains ``model`` on ``train_dataset`` (``train()``).

    ``eval_dataset``: the held-out test set, evaluated at the end of
    training (and periodically, per ``args.eval_every``, when there is no
    ``valid_dataset``). ``valid_dataset``: the validation set, evaluated
    every ``args.eval_every`` and at the end; it picks the best checkpoint
    (``args.metric_for_best``; ``self.best``), kept whatever
    ``keep_checkpoints`` says, and drives early stopping
    (``args.early_stopping_patience``). Datasets are iterables of batches
    (an ``OrcDataset``, a list of dicts); each pass over one is an epoch.

    ``hooks``: objects with any of ``on_log(trainer, logs)``,
    ``on_evaluate(trainer, metrics)`` (after an evaluation on
    ``eval_dataset``), ``on_validate(trainer, metrics)`` (after a validation,
    once ``trainer.best`` and ``trainer.bad_validations`` are updated) and
    ``on_step_end(trainer, step)``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        train_dataset,
        eval_dataset=None,
        dense_optimizer: torch.optim.Optimizer | None = None,
        sparse_optimizer=None,
        lr_scheduler=None,
        input_fn=None,
        loss_fn=None,
        hooks=(),
        valid_dataset=None,
    ):
        if valid_dataset is None:
            need = [f for f in ("early_stopping_patience", "load_best_at_end") if getattr(args, f)]
            if need:
                raise ValueError(
                    f"Trainer: TrainingArguments.{' and '.join(need)} need(s) a valid_dataset to validate on "
                    "(the eval_dataset is the held-out test set, not one to choose a model by)"
                )
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.valid_dataset = valid_dataset
        # Validation (with valid_dataset): the best so far ({metric, value,
        # step}), the validations since it without improvement, the last
        # validation's metrics; saved in every checkpoint and restored.
        self.best: dict | None = None
        self.bad_validations = 0
        self.stopped_early = False
        self._last_valid: dict | None = None
        self._saved_step: int | None = None  # the step of the checkpoint last saved (or resumed from)
        self._model_step: int | None = None  # the step of the checkpoint loaded by load_best
        self.dense_optimizer = dense_optimizer
        self.sparse_optimizer = sparse_optimizer
        if isinstance(lr_scheduler, (list, tuple)):
            from recis.optim import Schedulers

            lr_scheduler = Schedulers(lr_scheduler)  # e.g. the dense optimizer's and the sparse one's
        self.lr_scheduler = lr_scheduler
        self._grad_norm: float | None = None
        self._has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.input_fn = input_fn or (lambda b: b)
        self.loss_fn = loss_fn
        self._module = getattr(model, "module", model)
        self._task_losses: torch.Tensor | None = None  # the last micro-batch's per-task losses (multi-task)
        self.hooks = list(hooks)
        tables = collect_tables(model)
        self.tables = {t.name: t for t in tables}
        if len(self.tables) != len(tables):
            raise ValueError("Trainer: the model's tables must have distinct names (they name checkpoint files)")
        self.global_step = 0
        self.scaler = DynamicLossScaler() if args.mixed_precision == "fp16" else None
        if sparse_optimizer is not None and hasattr(sparse_optimizer, "in_backward"):
            self._choose_sparse_update(sparse_optimizer)
        os.makedirs(args.output_dir, exist_ok=True)
        self.checkpoints = CheckpointManager(os.path.join(args.output_dir, "checkpoints"), args.keep_checkpoints)
        self._lock, self._lock_depth = OutputDirLock(args.output_dir), 0
        self._log_path = os.path.join(args.output_dir, "log.jsonl")
        self._tb = None
        self._last_eval: dict | None = None
        self._want_tb = wanted(args.tensorboard, "tensorboard", "tensorboard")
        self._want_plot = wanted(args.plot, "matplotlib", "plot")
        self.curves_png = os.path.join(args.output_dir, "curves.png") if self._want_plot else None
        # Under torchrun: rank 0's dense parameters everywhere; rank 0 alone
        # writes logs, TensorBoard and curves.
        self.rank = distributed.rank()
        distributed.broadcast_dense(model)

    # -- state -------------------------------------------------------------------

    def _state(self) -> dict:
        return dict(
            tables=self.tables,
            model=self.model,
            dense_optimizer=self.dense_optimizer,
            sparse_optimizer=self.sparse_optimizer,
            lr_scheduler=self.lr_scheduler,
            dataset=self.train_dataset if hasattr(self.train_dataset, "state_dict") else None,
        )

    def save(self) -> str:
        extra = {"args": asdict(self.args)}
        # What a serving export of this checkpoint rebuilds the model and
        # its input from (``recis export CKPT``): a zoo model's spec, and the
        # job's input pipeline.
        spec = model_spec(getattr(self.model, "module", self.model))
        if spec is not None:
            extra["model_spec"] = spec
        if isinstance(self.input_fn, InputPipeline):
            extra["pipeline"] = self.input_fn.to_json()
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        if self.valid_dataset is not None:
            extra["validation"] = self._validation_state()
        best = None
        if self.best is not None and self.best["step"] == self.global_step:
            best = {"metric": self.best["metric"], "value": self.best["value"]}
        with self._holding_lock():
            path = self.checkpoints.save(self.global_step, **self._state(), extra=extra, best=best)
        self._saved_step = self.global_step
        return path

    def _validation_state(self) -> dict:
        """What a resumed run needs to go on validating as this one would."""
        b = self.best
        return {
            "metric": self.args.metric_for_best,
            "best_value": None if b is None else b["value"],
            "best_step": None if b is None else b["step"],
            "bad_validations": self.bad_validations,
            "last_step": None if self._last_valid is None else self._last_valid["step"],
        }

    def _restore_validation(self, saved: dict | None) -> None:
        """The validation state of the checkpoint resumed from (none in one
        written before validation sets existed: afresh)."""
        if not saved:
            return
        a = self.args
        if saved.get("metric") != a.metric_for_best:
            if self.rank == 0:
                print(
                    f"the checkpoint tracked the best by {saved.get('metric')!r}, this run by {a.metric_for_best!r}: "
                    "the best and the patience count start afresh"
                )
            return
        if saved.get("best_step") is not None:
            self.best = {"metric": a.metric_for_best, "value": saved["best_value"], "step": saved["best_step"]}
        self.bad_validations = int(saved.get("bad_validations") or 0)
        if saved.get("last_step") is not None:
            self._last_valid = {"step": int(saved["last_step"])}
        if self.best is None or self.rank != 0:
            return
        path = os.path.join(self.checkpoints.directory, f"ckpt-{self.best['step']}")
        if not os.path.isfile(os.path.join(path, "meta.json")):
            print(
                f"warning: the best checkpoint so far, {path} ({a.metric_for_best} {self.best['value']:.4f}), is gone; "
                "a later improvement on it will be kept"
            )
            self.checkpoints.clear_best()
        elif self.checkpoints.best() != path:
            self.checkpoints.mark_best(path, a.metric_for_best, self.best["value"])

    @contextlib.contextmanager
    def _holding_lock(self):
        """The output_dir's lock for what runs inside (re-entrant). Under
        torchrun rank 0 alone takes it, and every rank stops if it cannot:
        the ranks of a run share output_dir, so one lock stands for the run
        (locks a rank apart would let two runs of other world sizes share a
        directory), and rank 0 writes the checkpoints' renames and prunes."""
        if self._lock_depth == 0:
            failed = None
            if self.rank == 0:
                try:
                    self._lock.acquire()
                except OutputDirLocked:
                    failed = "locked"
                except OSError as e:  # e.g. a read-only output_dir: every rank must hear of it
                    failed = f"{self._lock.path}: cannot be locked ({e.strerror or e})"
            if not distributed.all_true(failed is None):
                pid = holder(self._lock.path)
                if failed not in (None, "locked"):
                    raise TrainingError(failed)
                if self.rank != 0:
                    raise TrainingError(
                        f"{self.args.output_dir}: rank 0 could not take its lock {self._lock.path} (pid {pid} is "
                        "written there); rank 0's message says why"
                    )
                raise TrainingError(
                    f"{self.args.output_dir} is in use by another run (pid {pid if pid is not None else 'unknown'} "
                    f"holds {self._lock.path}): one run at a time trains in an output_dir; wait for it to end, or "
                    "give another output_dir (nothing was changed)"
                )
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                self._lock.release()

    def _autocast(self):
        return _autocast(self.args.mixed_precision)

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self._log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._want_tb:
            if self._tb is None:
                self._tb = TensorBoardLog(os.path.join(self.args.output_dir, "tensorboard"))
            for split in ("eval", "valid"):
                if split in record:
                    self._tb.eval(record[split], split)
            if "loss" in record:
                self._tb.train(record)

    # -- loops ---------------------------------------------------------------------

    def _loss(self, batch) -> torch.Tensor:
        with self._autocast():
            logits = self.model(self.input_fn(batch))
        if self.loss_fn is not None:
            return self.loss_fn(logits.float(), batch)
        tasks = self.args.label_keys
        if tasks is None:
            return F.binary_cross_entropy_with_logits(logits.float(), self._labels(batch))
        y = self._labels(batch)
        check_task_logits(logits, tasks)
        per_task = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none").mean(dim=0)
        weights = self.args.task_weights or [1.0] * len(tasks)
        self._task_losses = per_task.detach()
        return sum(w * per_task[t] for t, w in enumerate(weights))

    def _labels(self, batch) -> torch.Tensor:
        """The labels as 0/1 floats: [B], or, multi-task, [B, T]; a
        missing column or a value that is not 0 or 1 is a TrainingError
        naming the task and its column."""
        a = self.args
        if a.label_keys is None:
            return _check_labels(
                batch,
                a.label_key,
                at=f" at step {self.global_step + 1}",
                then=f"; nothing was updated; {self.checkpoints.last_good_note()}",
            )
        when = f"at step {self.global_step + 1}" if self.model.training else f"in evaluation at step {self.global_step}"
        try:
            return task_labels(batch, a.label_keys, getattr(self._module, "label_nesting", None), when=f" {when}")
        except TrainingError as e:
            raise TrainingError(f"{e}; nothing was updated; {self.checkpoints.last_good_note()}") from None

    def _choose_sparse_update(self, opt) -> None:
        """``sparse_update``: in backward when nothing needs the sparse
        gradient between backward and step (no accumulation, no loss
        scaling), else deferred; an explicit choice that cannot hold is an
        error."""
        a = self.args
        needs = []
        if a.gradient_accumulation_steps > 1:
            needs.append(f"gradient_accumulation_steps = {a.gradient_accumulation_steps}")
        if self.scaler is not None:
            needs.append("fp16 loss scaling")
        if a.max_grad_norm is not None:
            needs.append("max_grad_norm (clipping)")
        mode = a.sparse_update
        asked = getattr(opt, "in_backward_requested", None)
        if mode == "auto" and asked is not None:
            mode = "in_backward" if asked else "deferred"  # the optimizer's own choice
        if mode == "in_backward" and needs:
            raise ValueError(
                f"Trainer: the sparse update cannot run in backward with {' and '.join(needs)}: they need the "
                "sparse gradient at the optimizer step (sparse_update = 'deferred', or in_backward=False)"
            )
        opt._set_in_backward(mode == "in_backward" or (mode == "auto" and not needs))

    def _optimizer_step(self) -> None:
        distributed.average_dense_gradients(self.model.parameters())
        if self.scaler is not None:
            # Every rank skips, or none: a rank's sparse gradients are those
            # of the ids it owns.
            finite = distributed.all_true(self.scaler.unscale(self.dense_optimizer, self.sparse_optimizer))
            self.scaler.update(finite)
            if not finite:
                # Skipped: an inf/NaN gradient at this scale; nothing changes.
                for opt in (self.sparse_optimizer, self.dense_optimizer):
                    if opt is not None:
                        opt.zero_grad()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()  # the schedule follows the step count
                return
        if self.args.max_grad_norm is not None:
            from recis.optim import clip_grad_norm_

            sparse = [self.sparse_optimizer] if self.sparse_optimizer is not None else []
            self._grad_norm = clip_grad_norm_(self.args.max_grad_norm, list(self.model.parameters()), sparse)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.step()
            self.sparse_optimizer.zero_grad()
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
            self.dense_optimizer.zero_grad()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def train(self) -> dict:
        """Trains to the end (epochs or max_steps); returns the last logs.
        Holds the output_dir's lock throughout. Under torchrun, a rank that
        goes silent ends every rank (``collective_timeout``)."""
        with self._holding_lock():
            with distributed.watch(self.args.collective_timeout, self.checkpoints.latest, self.global_step) as heart:
                self._heart = heart
                return self._train()

    def _resume(self) -> None:
        """From the newest checkpoint that verifies and, unless
        ``resume_suspect``, is not suspect; the newer damaged (suspect) ones
        are set aside (renamed ``ckpt-<step>.damaged`` or ``.suspect``) so
        that this run can save those steps again."""
        ckpt = self.checkpoints
        self.global_step = ckpt.load(**self._state(), skip_suspect=not self.args.resume_suspect)
        if self.rank == 0:
            for path, why in ckpt.skipped:
                kind = "suspect" if why.startswith("suspect") else "damaged"
                (moved,) = ckpt.set_aside([path], kind)
                print(f"skipped the {kind} checkpoint {path} ({why}); set aside as {moved}")
            ckpt.mend_pointer()
        self._saved_step = self.global_step
        if self.scaler is not None:
            saved = ckpt.loaded_meta.get("extra", {}).get("loss_scaler")
            if saved is not None:
                self.scaler.load_state_dict(saved)
        if self.rank == 0:
            print(f"resumed from {ckpt.loaded} at step {self.global_step}")
            why = suspect(ckpt.loaded)
            if why:
                print(f"warning: {ckpt.loaded} is suspect ({'; '.join(why)}); {ckpt.last_good_note()}")
        if self.valid_dataset is not None:
            self._restore_validation(ckpt.loaded_meta.get("extra", {}).get("validation"))

    def _train(self) -> dict:
        a = self.args
        if a.resume and self.checkpoints.checkpoints(complete=False):
            self._resume()
        elif not a.resume and self.checkpoints.checkpoints():
            raise TrainingError(
                f"{self.checkpoints.directory} holds checkpoints but resume=False: resume=True continues from them, "
                "or give another output_dir (nothing was changed)"
            )
        elif a.warm_start is not None:
            self._warm_start()
        self._heart.beat(self.global_step)
        self.model.train()
        k = a.gradient_accumulation_steps
        micro, window_batches, window_loss, window_n, t_window = 0, 0, 0.0, 0, time.perf_counter()
        tasks = a.label_keys if self.loss_fn is None else None
        window_tasks = [0.0] * len(tasks or ())
        logs: dict = {}
        start_epoch = getattr(self.train_dataset, "epoch", 0)
        done = a.max_steps is not None and self.global_step >= a.max_steps
        if a.early_stopping_patience and self.bad_validations >= a.early_stopping_patience:
            done = self.stopped_early = True  # resumed after it stopped early
            if self.rank == 0:
                print(
                    f"this run stopped early at step {self.global_step} ({a.metric_for_best} had not improved for "
                    f"{self.bad_validations} validations; early_stopping_patience {a.early_stopping_patience}): "
                    "nothing more to train"
                )
        every = a.eval_every
        for _ in range(start_epoch, a.epochs if a.max_steps is None else 1 << 62):
            if done:
                break
            for batch in self._lockstep(self.train_dataset, pad=False):
                if self._has_batch_norm and int(batch[a.label_key].numel()) == 1:
                    raise TrainingError(
                        f"a training batch of one row at step {self.global_step + 1} (the epoch's last): batch "
                        "norm needs more than one row to normalise by; drop the short last batch "
                        "(OrcDataset(drop_remainder=True), [data] drop_remainder = true) or change batch_size"
                    )
                loss = self._loss(batch)
                finite = math.isfinite(float(loss.detach()))
                if not distributed.all_true(finite):
                    what = f"({float(loss.detach())})"
                    if distributed.active():
                        flags = distributed.gather_arrays([np.array([finite])])[0]
                        what = f"on rank(s) {[r for r, ok in enumerate(flags) if not ok]}"
                    raise TrainingError(
                        f"non-finite loss {what} at step {self.global_step + 1}; stopped without updating; "
                        f"{self.checkpoints.last_good_note()}"
                    )
                (loss / k if self.scaler is None else self.scaler.scale_loss(loss) / k).backward()
                micro += 1
                window_batches += 1
                window_loss += float(loss.detach())
                if tasks and self._task_losses is not None:
                    window_tasks = [w + float(v) for w, v in zip(window_tasks, self._task_losses.tolist(), strict=True)]
                window_n += int(batch[a.label_key].numel())
                if micro % k:
                    continue
                self._optimizer_step()
                self.global_step += 1
                step = self.global_step
                self._heart.beat(step)
                if a.evict_every_steps and step % a.evict_every_steps == 0:
                    for t in self.tables.values():
                        if t.option.eviction is not None:
                            t.evict(step=t.step)
                if step % a.log_every_steps == 0:
                    now = time.perf_counter()
                    window_loss, window_batches, window_n, *window_tasks = distributed.sum_floats(
                        [window_loss, window_batches, window_n, *window_tasks]
                    )
                    logs = {
                        "step": step,
                        "loss": window_loss / window_batches,
                        "samples_per_s": window_n / (now - t_window),
                        "table_rows": {n: len(t) for n, t in self.tables.items()},
                    }
                    for task, v in zip(tasks or (), window_tasks, strict=True):
                        logs[f"loss_{task}"] = v / window_batches  # the task's own BCE, unweighted
                    if self._grad_norm is not None:
                        logs["grad_norm"] = self._grad_norm  # this step's, before clipping
                    if self.scaler is not None:
                        logs["loss_scale"] = self.scaler.scale
                        logs["skipped_steps"] = self.scaler.skipped
                    if a.progress and self.rank == 0:
                        print(self._progress_line(logs), flush=True)
                    self._log(logs)
                    window_batches, window_loss, window_n, t_window = 0, 0.0, 0, now
                    window_tasks = [0.0] * len(tasks or ())
                    for h in self.hooks:
                        if hasattr(h, "on_log"):
                            h.on_log(self, logs)
                if isinstance(every, int) and step % every == 0:
                    self._periodic_evaluation()
                if a.save_every_steps and step % a.save_every_steps == 0 and self._saved_step != step:
                    self.save()
                for h in self.hooks:
                    if hasattr(h, "on_step_end"):
                        h.on_step_end(self, step)
                if self._should_stop():
                    done = True
                    break
                if a.max_steps is not None and step >= a.max_steps:
                    done = True
                    break
            if not done and every == "epoch":
                self._periodic_evaluation()  # the end of an epoch
                done = self._should_stop()
        return self._finish(logs)

    def _periodic_evaluation(self) -> None:
        """A validation when there is a validation set, else an evaluation
        on eval_dataset (if any); not twice at one step (an epoch's end
        reached again on resuming from its last step)."""
        if self.valid_dataset is not None:
            if self._last_valid is None or self._last_valid["step"] != self.global_step:
                self.validate()
        elif self.eval_dataset is not None:
            if self._last_eval is None or self._last_eval["step"] != self.global_step:
                self.evaluate()

    def _should_stop(self) -> bool:
        """Early stopping: the last validation made ``early_stopping_patience``
        in a row without improving on the best. Says so (printed, and an
        ``early_stopping`` log record) the first time."""
        a = self.args
        if not a.early_stopping_patience or self.bad_validations < a.early_stopping_patience:
            return False
        if not self.stopped_early:
            self.stopped_early = True
            b = self.best
            record = {
                "step": self.global_step,
                "metric": a.metric_for_best,
                "patience": a.early_stopping_patience,
                "best_step": None if b is None else b["step"],
                "best_value": None if b is None else b["value"],
            }
            if self.rank == 0:
                best = "no finite value yet" if b is None else f"best {b['value']:.4f} at step {b['step']}"
                print(
                    f"early stopping at step {self.global_step}: valid {a.metric_for_best} has not improved for "
                    f"{self.bad_validations} validations ({best})",
                    flush=True,
                )
            self._log({"early_stopping": record})
        return True

    def _finish(self, logs: dict) -> dict:
        """The end of training: a last validation (unless one ran at this
        step), the last checkpoint (the exact resume point), the best
        checkpoint loaded (``load_best_at_end``), the final evaluation on
        ``eval_dataset``, curves."""
        a = self.args
        if self.valid_dataset is not None:
            last = self._last_valid
            if last is None or last["step"] != self.global_step:
                self.validate()
            if self._last_valid is not None and "auc" in self._last_valid:
                logs["valid"] = self._last_valid
            logs["best"] = None if self.best is None else dict(self.best)
        elif self.eval_dataset is not None:  # periodic evaluations were on it: the last one, if at this step
            last = self._last_eval
            logs["eval"] = last if last is not None and last["step"] == self.global_step else self.evaluate()
        if self.stopped_early:
            logs["early_stopped"] = True
        if self._saved_step != self.global_step:
            self.save()
        if a.load_best_at_end:
            self.load_best()
        if self.valid_dataset is not None and self.eval_dataset is not None:
            logs["eval"] = self.evaluate()  # the held-out test set, once
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.curves_png is not None and self.rank == 0 and os.path.exists(self._log_path):
            plot_curves(self._log_path, self.curves_png, title=type(self.model).__name__)
        return logs

    def load_best(self) -> str | None:
        """Loads the best checkpoint's tables and dense weights (not the
        optimizers: the tables' optimizer slots start afresh) into the model
        and returns its path; None, with a warning, when there is no best
        (no finite validation metric) or its checkpoint is gone. Training
        state (``global_step``, optimizers, the data cursor) stays the last
        step's: resume from the latest checkpoint, not from this model."""
        b = self.best
        if b is None:
            if self.rank == 0:
                print(f"warning: no best checkpoint to load (no validation gave a finite {self.args.metric_for_best})")
            return None
        path = os.path.join(self.checkpoints.directory, f"ckpt-{b['step']}")
        if not distributed.all_true(os.path.isfile(os.path.join(path, "meta.json"))):
            if self.rank == 0:
                print(f"warning: the best checkpoint {path} is gone; the model stays the last step's")
            return None
        if b["step"] != self.global_step:
            state = self._state()
            self.checkpoints.load(path, tables=state["tables"], model=state["model"], parts=("sparse", "dense"))
            self._model_step = b["step"]
            if self.rank == 0:
                print(f"loaded the best checkpoint {path} ({b['metric']} {b['value']:.4f} at step {b['step']})")
        return path

    def _warm_start(self) -> None:
        from recis.framework.checkpoint import CheckpointError, resolve_checkpoint

        a = self.args
        try:
            path = resolve_checkpoint(a.warm_start)
        except CheckpointError as e:
            raise CheckpointError(f"warm_start: {e}") from None
        state = self._state()
        step = self.checkpoints.load(
            path, **{k: v for k, v in state.items() if k != "dataset"}, parts=a.warm_start_parts
        )
        if self.rank == 0:
            print(f"warm start from {path} (step {step}): {', '.join(a.warm_start_parts)}")

    def _lockstep(self, data, pad: bool):
        return lockstep(data, pad)

    def _progress_line(self, logs: dict) -> str:
        a, step = self.args, logs["step"]
        if a.max_steps is not None:
            total = a.max_steps
        else:
            n = getattr(self.train_dataset, "__len__", None)
            total = len(self.train_dataset) * a.epochs // a.gradient_accumulation_steps if n else None
        if total:
            done = min(step / total, 1.0)
            bar = "#" * int(done * 20)
            head = f"[{bar:<20s}] {step}/{total}"
        else:
            head = f"step {step:6d}"
        line = f"{head}  loss {logs['loss']:.4f}"
        for task in a.label_keys or ():
            if f"loss_{task}" in logs:
                line += f"  {task} {logs[f'loss_{task}']:.4f}"
        line += f"  {logs['samples_per_s']:,.0f} samples/s"
        if "loss_scale" in logs:
            line += f"  scale {logs['loss_scale']:g}"
        return line

    def evaluate(self, dataset=None, log: bool = True) -> dict:
        """AUC, log loss, calibration (and GAUC with ``group_key``) over
        ``eval_dataset`` (or ``dataset``), at ``global_step``; inserts nothing
        into the tables. Printed (``eval: ...``); with ``log``, an ``{"eval":
        metrics}`` record in ``output_dir/log.jsonl`` (and TensorBoard); the
        ``on_evaluate`` hooks are called."""
        data = self.eval_dataset if dataset is None else dataset
        if data is None:
            raise ValueError("Trainer.evaluate: no eval_dataset, and no dataset given")
        metrics = {"step": self.global_step, **self._metrics(data)}
        if self.rank == 0:
            print("eval: " + _metrics_line(metrics))
        if log:
            record = {"eval": metrics}
            if self._model_step is not None and self._model_step != self.global_step:
                record["model_step"] = self._model_step  # the best checkpoint's model (load_best_at_end)
            self._log(record)
        if data is self.eval_dataset:
            self._last_eval = metrics
        for h in self.hooks:
            if hasattr(h, "on_evaluate"):
                h.on_evaluate(self, metrics)
        return metrics

    def validate(self) -> dict:
        """One validation: the metrics over ``valid_dataset`` at
        ``global_step``; then the best and the patience count
        (``bad_validations``) are updated, a new best is checkpointed at
        this step (or, if this step's checkpoint is saved already, the
        ``best`` pointer names it), and a ``{"valid": metrics, "best": ...,
        "bad_validations": N}`` record is logged; the ``on_validate`` hooks
        are called."""
        if self.valid_dataset is None:
            raise ValueError("Trainer.validate: the Trainer has no valid_dataset")
        a = self.args
        metrics = {"step": self.global_step, **self._metrics(self.valid_dataset)}
        value = metrics.get(a.metric_for_best)
        improved = value is not None and math.isfinite(value)
        if improved and self.best is not None:
            higher = best_metrics(a.label_keys)[a.metric_for_best]
            improved = value > self.best["value"] if higher else value < self.best["value"]
        if improved:
            self.best = {"metric": a.metric_for_best, "value": value, "step": self.global_step}
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        self._last_valid = metrics
        if self.rank == 0:
            if improved:
                note = f"new best {a.metric_for_best}"
            elif self.best is None:
                note = f"no finite {a.metric_for_best} yet"
            else:
                note = (
                    f"best {a.metric_for_best} {self.best['value']:.4f} at step {self.best['step']}; "
                    f"{self.bad_validations} validation(s) without improvement"
                )
            print(f"valid: {_metrics_line(metrics)}  ({note})", flush=True)
        if improved:
            if self._saved_step == self.global_step:
                path = os.path.join(self.checkpoints.directory, f"ckpt-{self.global_step}")
                self.checkpoints.mark_best(path, a.metric_for_best, value)
            else:
                self.save()  # saves the best pointer with it
        self._log(
            {
                "valid": metrics,
                "best": None if self.best is None else dict(self.best),
                "bad_validations": self.bad_validations,
            }
        )
        for h in self.hooks:
            if hasattr(h, "on_validate"):
                h.on_validate(self, metrics)
        return metrics

    def _metrics(self, data) -> dict:
        return evaluate_model(
            self.model,
            data,
            self.input_fn,
            group_key=self.args.group_key,
            mixed_precision=self.args.mixed_precision,
            labels=self._labels,
            label_keys=self.args.label_keys,
        )


def _metrics_line(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step")


def _autocast(mixed_precision: str | None):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _check_labels(batch, key: str, at: str = "", then: str = "") -> torch.Tensor:
    """``batch[key]`` as 0/1 floats; a missing column or another value is a
    TrainingError (``at``: where, after the value; ``then``: appended)."""
    if key not in batch:
        raise TrainingError(f"the batch has no label column {key!r} (it has {sorted(batch)})")
    y = batch[key]
    bad = (y != 0) & (y != 1)
    if bool(bad.any()):
        raise TrainingError(
            f"label column {key!r}: value {y[bad][0].item()!r}{at} is not 0 or 1 (binary cross-entropy needs clicks "
            f"as 0/1){then}"
        )
    return y.float()


def check_task_logits(logits: torch.Tensor, tasks) -> None:
    """A multi-task model's output: logits [B, T], T = len(tasks)."""
    if logits.dim() != 2 or logits.shape[1] != len(tasks):
        raise TrainingError(
            f"label_keys names {len(tasks)} tasks {list(tasks)} but the model returned logits of shape "
            f"{list(logits.shape)}: a multi-task model returns logits [B, {len(tasks)}], one column a task in "
            "label_keys' order"
        )


def task_labels(batch, keys, nesting=None, when: str = "") -> torch.Tensor:
    """The labels of the tasks ``keys`` as 0/1 floats [B, T]. A missing
    column, or a value that is not 0 or 1, is a TrainingError naming the
    task and its column; so is, with ``nesting`` ((task, parent) index
    pairs, e.g. ESMM's: its pCTCVR label is click AND conversion), a 1 of a
    task where its parent's label is 0."""
    cols = []
    for t, key in enumerate(keys):
        what = f"task {key!r} (label column {key!r}, task {t + 1} of {list(keys)})"
        if key not in batch:
            raise TrainingError(f"{what}: the batch has no column {key!r} (it has {sorted(batch)})")
        y = batch[key]
        bad = (y != 0) & (y != 1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0][0])
            raise TrainingError(
                f"{what}: value {y[bad][0].item()!r} (row {row} of a batch){when} is not 0 or 1 (binary "
                f"cross-entropy needs each task's label as 0/1)"
            )
        cols.append(y.float())
    y = torch.stack(cols, dim=1)
    for t, parent in nesting or ():
        bad = (y[:, t] > 0) & (y[:, parent] == 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0][0])
            raise TrainingError(
                f"task {keys[t]!r} (label column {keys[t]!r}): 1 at row {row} of a batch{when} where task "
                f"{keys[parent]!r} (label column {keys[parent]!r}) is 0: this model's task {keys[t]!r} nests in "
                f"{keys[parent]!r} (ESMM: its second label is click AND conversion, never 1 without a click; "
                f"write that column as {keys[parent]} * conversion)"
            )
    return y


def evaluate_model(
    model: torch.nn.Module,
    data,
    input_fn=None,
    *,
    label_key: str = "label",
    group_key: str | None = None,
    mixed_precision: str | None = None,
    labels=None,
    label_keys=None,
) -> dict:
    """AUC, log loss, calibration (and GAUC with ``group_key``) of ``model``
    over the batches of ``data`` (after ``input_fn``), in eval mode and
    without gradients; inserts nothing into the tables. Under torchrun each
    rank passes its share and the metrics are every rank's rows (every rank
    must call it). ``labels(batch)``: the labels as 0/1 floats (default:
    ``batch[label_key]``, checked to be 0 or 1). Returns {auc, log_loss,
    calibration[, gauc]}.

    ``label_keys`` (multi-task: the model's logits are [B, T]): the metrics
    of each task, ``auc_<task>``, ``log_loss_<task>``,
    ``calibration_<task>`` (and ``gauc_<task>``), a task named by its label
    key; the plain names are the first task's. ``labels(batch)`` then gives
    [B, T] (default: the columns ``label_keys``, checked)."""
    input_fn = input_fn or (lambda b: b)
    tasks = list(label_keys) if label_keys is not None else None
    nesting = getattr(getattr(model, "module", model), "label_nesting", None)
    if tasks is None:
        labels = labels or (lambda b: _check_labels(b, label_key))
    else:
        labels = labels or (lambda b: task_labels(b, tasks, nesting))
    was_training = model.training
    model.eval()
    n = 1 if tasks is None else len(tasks)
    auroc, ll, cal = [AUROC() for _ in range(n)], [LogLoss() for _ in range(n)], [Calibration() for _ in range(n)]
    gauc = [GAUC() for _ in range(n)] if group_key else None
    try:
        with torch.no_grad():
            for batch in lockstep(data, pad=True):
                with _autocast(mixed_precision):
                    logits = model(input_fn(batch))
                if tasks is not None:
                    check_task_logits(logits, tasks)
                p = torch.sigmoid(logits.float())
                y = labels(batch)
                for t in range(n):
                    pt, yt = (p, y) if tasks is None else (p[:, t], y[:, t])
                    auroc[t].update(yt, pt)
                    ll[t].update(yt, pt)
                    cal[t].update(yt, pt)
                    if gauc is not None:
                        gauc[t].update(yt, pt, batch[group_key])
    finally:
        model.train(was_training)
    for m in [*auroc, *ll, *cal, *(gauc or ())]:
        m.sync()
    per_task = []
    for t in range(n):
        m = {"auc": auroc[t].compute(), "log_loss": ll[t].compute(), "calibration": cal[t].compute()}
        if gauc is not None:
            m["gauc"] = gauc[t].compute()
        per_task.append(m)
    metrics = dict(per_task[0])  # single-task: these alone; multi-task: the first task's
    for task, m in zip(tasks or (), per_task if tasks else (), strict=True):
        metrics.update({f"{k}_{task}": v for k, v in m.items()})
    return metrics


def lockstep(data, pad: bool):
    """The batches of ``data``; under torchrun, in step with the other
    ranks, whose lookups need this one: training stops when the first
    rank runs out (the rest of that epoch's batches are skipped);
    evaluation goes on until the last does, a rank out of data passing
    empty batches."""
    if not distributed.active():
        yield from data
        return
    it, template, started = iter(data), None, False
    while True:
        batch = next(it, None)
        if template is None:
            template = batch
        if distributed.all_true(batch is not None):
            started = True
            yield batch
            continue
        if distributed.all_true(batch is None):
            return
        # Some ranks are out of data, others are not.
        if not pad and started:
            return
        can = batch is not None or (pad and template is not None)
        if not distributed.all_true(can):
            flags = distributed.gather_arrays([np.array([can])])[0]
            raise TrainingError(
                f"rank(s) {[r for r, ok in enumerate(flags) if not ok]} have no "
                f"{'evaluation' if pad else 'training'} data while the other ranks have: every rank needs a "
                "share (the files' ORC stripes are dealt out to the ranks: write more files or smaller stripes)"
            )
        yield batch if batch is not None else batch_rows(template, 0, 0)
