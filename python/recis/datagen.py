"""`recis datagen`: synthetic Criteo-layout ORC files with a hidden click
model (``recis.synthetic.SyntheticCTR``): an int label, ``I1..I13`` floats and
``C1..C26`` lists of 1-3 int64 ids (Zipf over the vocabulary, scrambled to
63-bit ids distinct per field). Learnable: every id has a fixed weight, and
fields 1 and 2 cross."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.orc as po

from recis.io.pipeline import FeatureInput, InputPipeline
from recis.synthetic import SyntheticCTR

SPARSE_FIELDS = [f"C{i}" for i in range(1, 27)]
DENSE_COLUMNS = [f"I{i}" for i in range(1, 14)]


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
    vectors: int = 0,
) -> list[str]:
    """``rows`` rows of the layout above in ``files`` ORC files; with
    ``vectors = K``, an ``item_vec`` column too: each row's item (its first
    C1 id) as a K-float content vector (``list<float>``, K a row) that the
    click model depends on (``SyntheticCTR.vector_dim``)."""
    if rows < 1 or files < 1:
        raise ValueError(f"datagen: rows and files must be >= 1, got {rows} and {files}")
    os.makedirs(output_dir, exist_ok=True)
    if vectors < 0:
        raise ValueError(f"datagen: vectors must be >= 0, got {vectors}")
    data = SyntheticCTR(num_features=26, num_dense=13, vocab=vocab, seed=seed, min_ids=1, max_ids=3, vector_dim=vectors)
    rng = np.random.default_rng(seed)
    paths = []
    per_file = -(-rows // files)
    for k in range(files):
        n = min(per_file, rows - k * per_file)
        if n <= 0:
            break
        extra: dict = {}
        feats, dense, labels = data.batch(n, rng, extra)
        cols = {"label": pa.array(labels.numpy().astype(np.int64))}
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
        path = os.path.join(output_dir, f"part-{k:05d}.orc")
        tmp = path + ".tmp"
        po.write_table(pa.table(cols), tmp, compression=compression)
        os.replace(tmp, path)
        paths.append(path)
    return paths
