"""Item titles as text vectors beside the sparse ids: a multimodal CTR job.

    python examples/text_vectors.py [--rows 40000] [--items 20000] [--out runs/examples/text]

A catalogue of ``--items`` items, each with a generated title ("soft blue
running shoes by Norde"); the click model is hidden and depends on the
item's kind (shoes, jackets, coffee makers, ...), which only the title
names. Items are drawn from a long tail, so most test items are rare or new
and their ids alone say little. The titles are embedded with WordLlama (a
small static text encoder whose weights ship in its PyPI wheel: nothing is
downloaded), written as a 256-float ``list<float>`` column ``title_vec``
beside ``item`` and ``segment``, and DeepFM is trained twice through
``recis.config.Job``: with ``[data] vectors = ["title_vec"]`` and without.
It prints both test AUCs.

Needs ``pip install wordllama`` (optional: ``pip install recis[text]``);
without it, it says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.orc as po

KINDS = [
    ("running shoes", 1.2),
    ("trail sneakers", 1.0),
    ("denim jacket", -0.4),
    ("wool coat", -0.6),
    ("coffee maker", 0.8),
    ("espresso machine", 0.9),
    ("yoga mat", -1.0),
    ("dumbbell set", -0.8),
    ("phone case", 0.3),
    ("laptop sleeve", 0.2),
    ("garden hose", -1.2),
    ("lawn mower", -1.0),
]
ADJECTIVES = ["soft", "light", "classic", "premium", "compact", "durable", "vintage", "modern", "slim", "bold"]
COLOURS = ["blue", "black", "red", "green", "grey", "white", "brown", "navy"]
BRANDS = ["Norde", "Kavo", "Lumen", "Brisk", "Oakra", "Tessa", "Vanta", "Quill", "Ember", "Sorin"]


def catalogue(items: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """(titles, each item's hidden click effect)."""
    kinds = rng.integers(0, len(KINDS), items)
    titles = [
        f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]} {COLOURS[rng.integers(len(COLOURS))]} {KINDS[k][0]} by "
        f"{BRANDS[rng.integers(len(BRANDS))]}"
        for k in kinds
    ]
    return titles, np.array([KINDS[k][1] for k in kinds])


def encoder():
    """WordLlama from the weights in its wheel, or None when it is not installed."""
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError:
        return None
    from pathlib import Path

    # Its wheel holds the 256-d weights and the tokenizer; cache_dir points at
    # them so that nothing is looked for on the network.
    return WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def write_data(out: str, rows: int, items: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    titles, effect = catalogue(items, rng)
    vectors = encoder().embed(titles).astype(np.float32)  # [items, 256]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-6
    # A long tail of items: Zipf ranks over a shuffled catalogue.
    order = rng.permutation(items)
    p = 1.0 / np.arange(1, items + 1) ** 0.8
    item = order[rng.choice(items, size=rows, p=p / p.sum())]
    segment = rng.integers(0, 8, rows)
    logit = -1.2 + effect[item] + 0.3 * (segment % 2)
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    k = vectors.shape[1]
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    parts = np.array_split(np.arange(rows), 4)
    for n, idx in enumerate(parts):
        vec = vectors[item[idx]].reshape(-1)
        table = pa.table(
            {
                "label": label[idx],
                "item": item[idx].astype(np.int64),
                "segment": segment[idx].astype(np.int64),
                "title_vec": pa.ListArray.from_arrays(pa.array(np.arange(len(idx) + 1, dtype=np.int32) * k), vec),
            }
        )
        po.write_table(table, os.path.join(out, "data", f"part-{n:05d}.orc"))


JOB = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc", "data/part-00002.orc"]
eval = ["data/part-00003.orc"]
{vectors}
batch_size = 256

[model]
name = "deepfm"
dim = 8
hidden = [64, 32]

[[feature]]
name = "item"
[[feature]]
name = "segment"

[optimizer]
sparse_lr = 0.01
dense_lr = 0.003

[trainer]
output_dir = "{name}"
epochs = 2
log_every_steps = 100000
"""


def train(out: str, with_vectors: bool) -> float:
    from recis.config import Job, load_config

    name = "with_title" if with_vectors else "ids_only"
    vectors = 'vectors = ["title_vec"]\nvector_widths = [256]' if with_vectors else ""
    path = os.path.join(out, f"{name}.toml")
    with open(path, "w") as f:
        f.write(JOB.format(vectors=vectors, name=name))
    job = Job(load_config(path, ["trainer.resume=false"]))
    return job.trainer.train()["eval"]["auc"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=40000)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/examples/text")
    args = ap.parse_args(argv)
    if encoder() is None:
        print("examples/text_vectors.py needs wordllama: pip install wordllama", file=sys.stderr)
        return 2
    if os.path.isdir(args.out) and os.listdir(args.out):
        print(f"{args.out} is not empty: give another --out", file=sys.stderr)
        return 2
    write_data(args.out, args.rows, args.items, args.seed)
    ids_only = train(args.out, False)
    with_title = train(args.out, True)
    print(f"test AUC: ids only {ids_only:.4f}, ids + title vectors {with_title:.4f}")
    return 0


def parse_result(text: str) -> tuple[float, float]:
    m = re.search(r"ids only (\d\.\d+), ids \+ title vectors (\d\.\d+)", text)
    return float(m.group(1)), float(m.group(2))


if __name__ == "__main__":
    sys.exit(main())
