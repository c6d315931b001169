"""`recis datagen`: synthetic Criteo-layout ORC files with a hidden click
model (``recis.synthetic.SyntheticCTR``): an int label, ``I1..I13`` floats and
``C1..C26`` lists of 1-3 int64 ids (Zipf over the vocabulary, scrambled to
63-bit ids distinct per field). Learnable: every id has a fixed weight, and
fields 1 and 2 cross.

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


def generate(
    output_dir: str,
    rows: int,
    files: int = 4,
    vocab: int = 1_000_000,
    seed: int = 0,
    compression: str = "zstd",
    behaviour: bool = False,
    items: int = 1000,
    categories: int = 20,
    max_history: int = 40,
    base_scale: float = 0.5,
) -> list[str]:
    """Writes ``rows`` rows into ``files`` ORC files of ``output_dir`` and
    returns their paths. ``items``, ``categories``, ``max_history`` and
    ``base_scale`` shape the behaviour columns and their click term (see
    the module docstring); without ``behaviour`` they are not used."""
    if rows < 1 or files < 1:
        raise ValueError(f"datagen: rows and files must be >= 1, got {rows} and {files}")
    behaviour_data = None
    if behaviour:
        if max_history < 0 or not 1 <= categories <= items:
            raise ValueError(
                f"datagen: behaviour needs max_history >= 0 and 1 <= categories <= items, got "
                f"max_history={max_history}, categories={categories}, items={items}"
            )
        behaviour_data = SyntheticBehaviour(items=items, categories=categories, max_history=max_history, seed=seed)
    os.makedirs(output_dir, exist_ok=True)
    data = SyntheticCTR(num_features=26, num_dense=13, vocab=vocab, seed=seed, min_ids=1, max_ids=3)
    rng = np.random.default_rng(seed)
    paths = []
    per_file = -(-rows // files)
    for k in range(files):
        n = min(per_file, rows - k * per_file)
        if n <= 0:
            break
        if behaviour_data is None:
            feats, dense, labels = data.batch(n, rng)
        else:
            feats, dense, logit = data.batch_logits(n, rng)
            target, history, term = behaviour_data.batch(n, rng)
            labels = data.labels(base_scale * logit + term, rng)
        cols = {"label": pa.array(labels.numpy().astype(np.int64))}
        for i in range(13):
            cols[f"I{i + 1}"] = pa.array(dense[:, i].numpy())
        for name, rt in feats.items():
            cols[name] = pa.ListArray.from_arrays(
                pa.array(rt.offsets.numpy().astype(np.int32)), pa.array(rt.values.numpy())
            )
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
