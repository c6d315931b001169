"""Training curves: TensorBoard event files while training, and a PNG of
the loss and evaluation AUC (the validation AUC, with a validation set) from
``log.jsonl`` at the end.

Both use optional packages made for the job (``tensorboard`` through
``torch.utils.tensorboard``; ``matplotlib``); ``make demo`` / ``make test``
install them.
"""

from __future__ import annotations

import importlib.util
import json
import os


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def wanted(flag: bool | None, module: str, what: str) -> bool:
    """None: if ``module`` is installed; True: required (an error if not)."""
    if flag is None:
        return available(module)
    if flag and not available(module):
        raise ValueError(f"TrainingArguments.{what}=True needs the {module!r} package (pip install {module})")
    return bool(flag)


class TensorBoardLog:
    """Scalars of the Trainer's log records as TensorBoard events (a
    multi-task job's per-task losses as ``train/loss_<task>``)."""

    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)

    def train(self, logs: dict) -> None:
        step = logs["step"]
        self.writer.add_scalar("train/loss", logs["loss"], step)
        self.writer.add_scalar("train/samples_per_s", logs["samples_per_s"], step)
        if "loss_scale" in logs:
            self.writer.add_scalar("train/loss_scale", logs["loss_scale"], step)
        self.writer.add_scalar("train/table_rows", sum(logs["table_rows"].values()), step)
        for k, v in logs.items():
            if k.startswith("loss_") and k != "loss_scale":  # a multi-task job's per-task losses
                self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.flush()

    def eval(self, metrics: dict, split: str = "eval") -> None:
        """An evaluation's metrics as ``<split>/<metric>`` ("eval": the
        eval data, "valid": the validation data); a multi-task job's
        per-task metrics too (``<split>/auc_<task>``...)."""
        for k, v in metrics.items():
            if k != "step":
                self.writer.add_scalar(f"{split}/{k}", v, metrics["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_log(path: str, split: str = "eval") -> tuple[dict[int, float], dict[int, float]]:
    """(step -> training loss, step -> AUC on ``split``: "eval", the eval
    data, or "valid", the validation data) from a ``log.jsonl``; a step
    logged again after a resume keeps its last record."""
    loss, auc = {}, {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if split in rec:
                auc[rec[split]["step"]] = rec[split]["auc"]
            elif "loss" in rec:
                loss[rec["step"]] = rec["loss"]
    return loss, auc


def read_task_aucs(path: str, split: str = "eval") -> dict[str, dict[int, float]]:
    """{task: step -> AUC} of a multi-task run's ``split`` records (their
    ``auc_<task>`` keys); empty for a single-task run."""
    out: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if split in rec:
                for k, v in rec[split].items():
                    if k.startswith("auc_"):
                        out.setdefault(k[4:], {})[rec[split]["step"]] = v
    return out


def plot_curves(log_path: str, png_path: str, title: str = "") -> str:
    """Writes a PNG of the training loss and the evaluation AUC by step
    (a multi-task run's: each task's, the validation's when it has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, auc = read_log(log_path)
    _, valid = read_log(log_path, "valid")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = sorted(loss)
    ax1.plot(steps, [loss[s] for s in steps], color="tab:blue")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (log loss)")
    ax1.grid(alpha=0.3)
    tasks = read_task_aucs(log_path, "valid" if valid else "eval")
    if len(tasks) > 1:  # multi-task: a curve a task
        which = "validation" if valid else "eval"
        for task, curve in tasks.items():
            steps = sorted(curve)
            ax2.plot(steps, [curve[s] for s in steps], marker="o", label=f"{task} ({which})")
        ax2.legend()
    elif valid:  # validation curve, and the eval (test) data's AUC at the end
        steps = sorted(valid)
        ax2.plot(steps, [valid[s] for s in steps], marker="o", color="tab:orange", label="validation")
        steps = sorted(auc)
        ax2.plot(steps, [auc[s] for s in steps], marker="s", linestyle="", color="tab:green", label="eval (test)")
        ax2.legend()
    else:
        steps = sorted(auc)
        ax2.plot(steps, [auc[s] for s in steps], marker="o", color="tab:orange")
    ax2.set_xlabel("step")
    ax2.set_ylabel("evaluation AUC")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
