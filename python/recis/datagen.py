"""`recis datagen`: synthetic Criteo-layout ORC files with a hidden click
model (``recis.synthetic.SyntheticCTR``): an int label, ``I1..I13`` floats and
``C1..C26`` lists of 1-3 int64 ids (Zipf over the vocabulary, scrambled to
63-bit ids distinct per field). Learnable: every id has a fixed weight, and
fields 1 and 2 cross.

``tasks=2`` (``recis datagen --tasks 2``) adds a second int label,
``conversion``, after ``label``: a hidden conversion model of its own (fixed
weights of the ids of fields ``C3..C6`` and of ``C1``, another salt than
the click model's, and the dense column ``I2``) gives each row a
conversion probability, and a row converts only if it was clicked:
``conversion = label AND draw < sigmoid(cvr_logit)``, so ``conversion`` is
the click-and-conversion label ESMM's pCTCVR is trained on (it is never 1
where ``label`` is 0). The conversion draws come from their own seeded
stream: the click columns are those of ``tasks=1``, whose output is as it
was before ``tasks`` existed, byte for byte.

``behaviour=True`` (``recis datagen --behaviour``) adds two columns, after
those: ``item`` (int64, a target item id) and ``hist_items`` (list<int64>,
the items the user clicked before, oldest first, 0..``max_history`` of
them), drawn by ``recis.synthetic.SyntheticBehaviour``: items belong to
hidden categories, and the click logit is ``base_scale`` times the Criteo
layout's plus a term that rises with the recent history items that share
the target's category (a model that attends over the history from the
target sees it; one that sums the history's fields loses it). Without it
the files are those of earlier versions, byte for byte."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.orc as po

from recis.io.pipeline import FeatureInput, InputPipeline
from recis.synthetic import SyntheticBehaviour, SyntheticCTR

SPARSE_FIELDS = [f"C{i}" for i in range(1, 27)]
DENSE_COLUMNS = [f"I{i}" for i in range(1, 14)]
TARGET_COLUMN = "item"  # with behaviour: the target item
HISTORY_COLUMN = "hist_items"  # with behaviour: the items clicked before, oldest first


# A reader batch of this layout as DeepFM input: the sparse fields, and the
# 13 dense columns stacked into ``dense``. An ``InputPipeline`` (callable on a
# batch), so that checkpoints of models trained on it (``recis demo``) record
# it and their serving exports can score ORC files.
to_model_input = InputPipeline(
    features=[FeatureInput(f, f) for f in SPARSE_FIELDS],
    label="label",
    dense=list(DENSE_COLUMNS),
    where="recis.datagen layout",
)

# The same layout with both labels of ``generate(tasks=2)``: the tasks
# ``label`` (click) and ``conversion`` (click and conversion).
to_multitask_input = InputPipeline(
    features=[FeatureInput(f, f) for f in SPARSE_FIELDS],
    label="label",
    labels=["label", "conversion"],
    dense=list(DENSE_COLUMNS),
    where="recis.datagen layout",
)

# The hidden conversion model: which fields, which salt, the base logit.
CVR_FIELDS = [0, 2, 3, 4, 5]  # C1, C3..C6
CVR_SALT = 7000
CVR_BIAS = -0.3


def conversion_logit(data: SyntheticCTR, feats: dict, dense) -> np.ndarray:
    """The hidden conversion model's logit of each row (given a click)."""
    names = data.feature_names()
    n = len(feats[names[0]].offsets) - 1
    logit = np.full(n, CVR_BIAS)
    for f in CVR_FIELDS:
        rt = feats[names[f]]
        ids, offsets = rt.values.numpy(), rt.offsets.numpy()
        w = data.id_weight(ids, CVR_SALT + f)
        logit += np.add.reduceat(w, offsets[:-1]) / np.diff(offsets)
    if dense is not None and dense.shape[1] > 1:
        logit += 0.8 * dense[:, 1].numpy().astype(np.float64)
    return logit


def generate(
    output_dir: str,
    rows: int,
    files: int = 4,
    vocab: int = 1_000_000,
    seed: int = 0,
    compression: str = "zstd",
    vectors: int = 0,
    tasks: int = 1,
    behaviour: bool = False,
    items: int = 1000,
    categories: int = 20,
    max_history: int = 40,
    base_scale: float = 0.5,
) -> list[str]:
    """``rows`` rows of the layout above in ``files`` ORC files of
    ``output_dir``; returns their paths. ``vectors = K``: an ``item_vec``
    column too, each row's item (its first C1 id) as a K-float content
    vector that the click model depends on (``SyntheticCTR.vector_dim``).
    ``items``, ``categories``, ``max_history`` and ``base_scale`` shape the
    behaviour columns and their click term (see the module docstring);
    without ``behaviour`` they are not used."""
    if rows < 1 or files < 1:
        raise ValueError(f"datagen: rows and files must be >= 1, got {rows} and {files}")
    if tasks not in (1, 2):
        raise ValueError(f"datagen: tasks must be 1 (click) or 2 (click and conversion), got {tasks!r}")
    behaviour_data = None
    if behaviour:
        if max_history < 0 or not 1 <= categories <= items:
            raise ValueError(
                f"datagen: behaviour needs max_history >= 0 and 1 <= categories <= items, got "
                f"max_history={max_history}, categories={categories}, items={items}"
            )
        behaviour_data = SyntheticBehaviour(items=items, categories=categories, max_history=max_history, seed=seed)
    os.makedirs(output_dir, exist_ok=True)
    if vectors < 0:
        raise ValueError(f"datagen: vectors must be >= 0, got {vectors}")
    data = SyntheticCTR(num_features=26, num_dense=13, vocab=vocab, seed=seed, min_ids=1, max_ids=3, vector_dim=vectors)
    rng = np.random.default_rng(seed)
    # The conversion draws: a stream of their own, so that the click
    # columns are those of tasks=1.
    cvr_rng = np.random.default_rng([seed, 2]) if tasks == 2 else None
    paths = []
    per_file = -(-rows // files)
    for k in range(files):
        n = min(per_file, rows - k * per_file)
        if n <= 0:
            break
        extra: dict = {}
        if behaviour_data is None:
            feats, dense, labels = data.batch(n, rng, extra)
        else:
            feats, dense, logit = data.batch_logits(n, rng, extra)
            target, history, term = behaviour_data.batch(n, rng)
            labels = data.labels(base_scale * logit + term, rng)
        cols = {"label": pa.array(labels.numpy().astype(np.int64))}
        if cvr_rng is not None:
            p = 1.0 / (1.0 + np.exp(-conversion_logit(data, feats, dense)))
            converted = (labels.numpy() > 0) & (cvr_rng.random(n) < p)
            cols["conversion"] = pa.array(converted.astype(np.int64))
        for i in range(13):
            cols[f"I{i + 1}"] = pa.array(dense[:, i].numpy())
        for name, rt in feats.items():
            cols[name] = pa.ListArray.from_arrays(
                pa.array(rt.offsets.numpy().astype(np.int32)), pa.array(rt.values.numpy())
            )
        if vectors:
            vec = extra["item_vec"]
            offsets = np.arange(n + 1, dtype=np.int32) * vectors
            cols["item_vec"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vec.reshape(-1)))
        if behaviour_data is not None:
            cols[TARGET_COLUMN] = pa.array(target.numpy())
            cols[HISTORY_COLUMN] = pa.ListArray.from_arrays(
                pa.array(history.offsets.numpy().astype(np.int32)), pa.array(history.values.numpy())
            )
        path = os.path.join(output_dir, f"part-{k:05d}.orc")
        tmp = path + ".tmp"
        po.write_table(pa.table(cols), tmp, compression=compression)
        os.replace(tmp, path)
        paths.append(path)
    return paths
