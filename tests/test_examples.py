"""The real-data examples (examples/*.toml): convert the slices in
../shared/data, train and evaluate through `recis`. Skipped where the
shared data is absent."""

import os
import re

import pytest

from recis.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

pytestmark = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"real-data slices not present at {SHARED}")


def job(name, tmp_path):
    text = open(os.path.join(ROOT, "examples", f"{name}.toml")).read()
    text = text.replace(f"../runs/examples/{name}/", f"{tmp_path}/")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["avazu", "criteo"])
def test_example_converts_trains_and_evaluates(name, tmp_path, capsys):
    if name == "avazu":
        src = os.path.join(SHARED, "avazu")
        assert main(["convert", "--format", "avazu", f"{src}/avazu_train.csv", "-o", str(tmp_path / "train")]) == 0
        dev, test = f"{src}/avazu_dev.csv", f"{src}/avazu_test.csv"
        assert main(["convert", "--format", "avazu", "--no-header", dev, "-o", str(tmp_path / "valid")]) == 0
        assert main(["convert", "--format", "avazu", "--no-header", test, "-o", str(tmp_path / "test")]) == 0
    else:
        src = os.path.join(SHARED, "criteo", "criteo_kaggle_head_train.txt")
        assert main(["convert", "--format", "criteo", "--rows-per-file", "720", src, "-o", str(tmp_path / "data")]) == 0
    path = job(name, tmp_path)
    assert main(["train", "--config", path]) == 0
    assert main(["eval", "--config", path] + (["--checkpoint", "best"] if name == "avazu" else [])) == 0
    out = capsys.readouterr().out
    if name == "avazu":  # validated each epoch, stopped early or ran its epochs, the best one tested
        assert "valid: auc" in out and re.search(r"best: .*ckpt-\d+ \(valid auc", out), out
    aucs = [float(x) for x in re.findall(r"eval: auc (\d\.\d+)", out)]
    # Both slices are learnable: well above chance on the held-out rows.
    assert aucs and aucs[-1] > 0.6, out
    assert (tmp_path / "job" / "curves.png").exists()


def test_text_vectors_example_learns_from_the_titles(tmp_path, capsys):
    """examples/text_vectors.py: titles embedded by WordLlama (its weights ship
    in its wheel) as a vector column beside the ids. Optional: skipped
    without wordllama."""
    pytest.importorskip("wordllama", reason="wordllama (an optional text encoder) is not installed")
    import importlib.util

    spec = importlib.util.spec_from_file_location("text_vectors", os.path.join(ROOT, "examples", "text_vectors.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--out", str(tmp_path / "t"), "--rows", "20000", "--items", "10000"]) == 0
    ids_only, with_title = example.parse_result(capsys.readouterr().out)
    # Measured (seeds 0, 1, 2): 0.638 / 0.706, 0.643 / 0.716, 0.648 / 0.726.
    assert with_title > ids_only + 0.03, (ids_only, with_title)
