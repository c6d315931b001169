"""Multi-task models on dynamic embeddings: Shared-Bottom, MMoE and ESMM.

Each maps a batch (the sparse fields, plus ``"dense"`` [B, num_dense]) to
logits [B, T], one column a task, in the order of the job's label columns
(``TrainingArguments.label_keys``, ``[data] labels``); the Trainer's loss is
the weighted sum of the tasks' binary cross-entropies. Like the single-task
zoo they share one ``EmbeddingEngine`` over the sparse fields (a field's
pooled embedding is the same input to every task), take ``dropout`` and
``batch_norm`` for their MLPs' hidden layers (never an output layer), and
are rebuilt from ``model_spec`` (serving exports, checkpoints).

- ``SharedBottom``: a bottom MLP over the embeddings and dense features,
  shared by the tasks, then a tower MLP a task.
- ``MMoE`` (Ma et al., 2018): ``num_experts`` expert MLPs over the same
  input; each task mixes the experts' outputs with a softmax gate of its own
  (a Linear over the input), then its tower.
- ``ESMM`` (Ma et al., 2018): a CTR tower and a CVR tower over the shared
  embeddings; its two outputs are the logits of pCTR and of
  pCTCVR = pCTR * pCVR, trained over every impression with the labels click
  and click AND conversion (its second label must be 0 wherever the first
  is: ``label_nesting``, which the Trainer checks). pCVR, the conversion
  probability given a click, is ``ESMM.cvr_probability`` (pCTCVR / pCTR).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recis.models.common import check_regularization, dense_input, mlp, sparse_engine, zoo_model


def _check_tasks(num_tasks, where: str) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{where}: num_tasks must be an int >= 1, got {num_tasks!r}")


class _MultiTaskBase(nn.Module):
    """The shared input: every field's pooled embedding, flattened, then the
    dense features."""

    multitask = True
    # (task, parent task) pairs whose labels nest: a row's label of the task
    # may be 1 only where its parent's is 1. None: the labels are free.
    label_nesting: tuple[tuple[int, int], ...] | None = None

    def _setup_input(self, sparse_fields, num_dense, dim, seed, coalesce):
        self.sparse_fields, self.embedding, self.project = sparse_engine(sparse_fields, dim, seed, coalesce)
        self.num_dense, self.dim = num_dense, dim
        return dim * len(self.sparse_fields) + num_dense

    def tables(self):
        return self.embedding.tables()

    def features(self, batch: dict) -> torch.Tensor:
        x = self.project.stacked(self.embedding, batch, self.sparse_fields).flatten(1)  # [B, F * dim]
        dense = dense_input(batch, self.num_dense, x.dtype)
        return x if dense is None else torch.cat([x, dense], dim=1)


def _towers(width, tower, num_tasks, dropout, batch_norm) -> nn.ModuleList:
    return nn.ModuleList(mlp(width, tower, dropout=dropout, batch_norm=batch_norm)[0] for _ in range(num_tasks))


@zoo_model("shared_bottom")
class SharedBottom(_MultiTaskBase):
    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        bottom: tuple[int, ...] = (256, 128),
        tower: tuple[int, ...] = (64,),
        num_tasks: int = 2,
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        check_regularization(dropout, batch_norm, "SharedBottom")
        _check_tasks(num_tasks, "SharedBottom")
        if not bottom:
            raise ValueError("SharedBottom: bottom needs at least one layer (the shared part)")
        width = self._setup_input(sparse_fields, num_dense, dim, seed, coalesce)
        self.num_tasks = num_tasks
        self.bottom, width = mlp(width, bottom, out=None, dropout=dropout, batch_norm=batch_norm)
        self.towers = _towers(width, tower, num_tasks, dropout, batch_norm)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B, num_tasks]."""
        h = self.bottom(self.features(batch))
        return torch.cat([t(h) for t in self.towers], dim=1)


@zoo_model("mmoe")
class MMoE(_MultiTaskBase):
    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        num_experts: int = 4,
        expert: tuple[int, ...] = (128, 64),
        tower: tuple[int, ...] = (32,),
        num_tasks: int = 2,
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        check_regularization(dropout, batch_norm, "MMoE")
        _check_tasks(num_tasks, "MMoE")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"MMoE: num_experts must be an int >= 1, got {num_experts!r}")
        if not expert:
            raise ValueError("MMoE: expert needs at least one layer")
        width = self._setup_input(sparse_fields, num_dense, dim, seed, coalesce)
        self.num_tasks, self.num_experts = num_tasks, num_experts
        self.experts = nn.ModuleList(
            mlp(width, expert, out=None, dropout=dropout, batch_norm=batch_norm)[0] for _ in range(num_experts)
        )
        self.gates = nn.ModuleList(nn.Linear(width, num_experts) for _ in range(num_tasks))
        self.towers = _towers(expert[-1], tower, num_tasks, dropout, batch_norm)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Each task's softmax over the experts, [B, num_tasks, num_experts]."""
        return torch.stack([F.softmax(g(x), dim=-1) for g in self.gates], dim=1)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B, num_tasks]."""
        x = self.features(batch)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, w]
        mixed = torch.bmm(self.gate_weights(x), experts)  # [B, T, w]
        return torch.cat([t(mixed[:, i]) for i, t in enumerate(self.towers)], dim=1)


# log pCTCVR is clamped below 0 by this much, so that its logit stays finite.
_LOG_P_MAX = -1e-7


@zoo_model("esmm")
class ESMM(_MultiTaskBase):
    # Its outputs: pCTR (task 0) and pCTCVR (task 1), whose label (click AND
    # conversion) may be 1 only where the click label is.
    label_nesting = ((1, 0),)

    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        ctr_tower: tuple[int, ...] = (128, 64),
        cvr_tower: tuple[int, ...] = (128, 64),
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        check_regularization(dropout, batch_norm, "ESMM")
        width = self._setup_input(sparse_fields, num_dense, dim, seed, coalesce)
        self.num_tasks = 2
        self.ctr, _ = mlp(width, ctr_tower, dropout=dropout, batch_norm=batch_norm)
        self.cvr, _ = mlp(width, cvr_tower, dropout=dropout, batch_norm=batch_norm)

    def tower_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(CTR logits [B], CVR logits [B]): the towers' own outputs."""
        x = self.features(batch)
        return self.ctr(x).squeeze(1), self.cvr(x).squeeze(1)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B, 2]: of pCTR, and of pCTCVR = pCTR * pCVR (computed in
        log space: log pCTCVR = log sigmoid(ctr) + log sigmoid(cvr))."""
        ctr, cvr = self.tower_logits(batch)
        log_p = (F.logsigmoid(ctr.float()) + F.logsigmoid(cvr.float())).clamp(max=_LOG_P_MAX)
        ctcvr = log_p - torch.log(-torch.expm1(log_p))  # logit(p) = log p - log(1 - p)
        return torch.stack([ctr.float(), ctcvr], dim=1)

    def cvr_probability(self, batch: dict) -> torch.Tensor:
        """pCVR [B]: the probability of a conversion given a click."""
        return torch.sigmoid(self.tower_logits(batch)[1].float())
