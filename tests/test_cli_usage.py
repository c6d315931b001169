"""The `recis` command as a user meets it: packaging (`python -m recis`, the
declared dependencies, Python 3.10's TOML parser), `--help`, exit codes,
`--set` / `--print-config`, the demo's work directory, and the checks a job
makes of its columns before it trains."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "recis"


def recis(*args, **kw):
    """``python -m recis ARGS`` in a child (PYTHONPATH inherited)."""
    return subprocess.run([sys.executable, "-m", "recis", *args], capture_output=True, text=True, timeout=120, **kw)


# ---------------------------------------------------------------------------
# Packaging


def test_python_dash_m_recis_runs_the_cli():
    done = recis("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("recis "), done.stdout
    done = recis("inspect", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: recis inspect"), done.stdout


def imported_modules() -> set[str]:
    """Top-level modules that python/recis imports (anywhere: at module level
    or inside a command), less the standard library and recis itself."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"recis", "__future__"}


def test_every_runtime_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    declared = {}
    for req in project["dependencies"]:
        name = req.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        declared[name] = req
    assert declared["tomli"].replace(" ", "").endswith(';python_version<"3.11"'), declared["tomli"]
    assert "pyarrow" in declared
    # Optional: the curves extra (matplotlib; TensorBoard comes through
    # torch.utils.tensorboard) and the TorchRec bridge (recis.ragged).
    optional = {"matplotlib", "torchrec"}
    imported = imported_modules()
    assert imported - optional <= set(declared), sorted(imported - optional - set(declared))
    assert {"torch", "numpy", "safetensors", "pyarrow", "tomli"} <= imported


FALLBACK = """
import sys, types, tomllib as real
del sys.modules["tomllib"]
sys.modules["tomllib"] = None  # as on Python 3.10: no such module
tomli = types.ModuleType("tomli")
tomli.load, tomli.loads, tomli.TOMLDecodeError = real.load, real.loads, real.TOMLDecodeError
sys.modules["tomli"] = tomli
import recis.config
assert recis.config.tomllib is tomli, recis.config.tomllib
cfg = recis.config.load_config(sys.argv[1])
print(cfg.trainer.epochs)
"""


@pytest.mark.skipif(sys.version_info < (3, 11), reason="no tomllib to take away: recis.config uses tomli already")
def test_without_tomllib_the_config_is_read_by_tomli(tmp_path):
    (tmp_path / "job.toml").write_text(
        '[data]\ntrain = ["d"]\n[[feature]]\nname = "C1"\n[trainer]\noutput_dir = "out"\nepochs = 7\n'
    )
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK, str(tmp_path / "job.toml")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "7"


# ---------------------------------------------------------------------------
# One set of defaults


def test_python_api_zoo_and_config_start_rows_alike(tmp_path):
    from recis.config import FeatureConfig, Job, load_config
    from recis.datagen import generate
    from recis.models import DeepFM
    from recis.nn import DEFAULT_INITIALIZER, EmbeddingOption, NormalInit

    assert DEFAULT_INITIALIZER == NormalInit(0.0, 0.01)
    assert EmbeddingOption(dim=4).initializer == DEFAULT_INITIALIZER
    assert FeatureConfig("C1").init_std == DEFAULT_INITIALIZER.std
    model = DeepFM(["a", "b"], dim=4)
    assert all(t.option.initializer == DEFAULT_INITIALIZER for t in model.tables())
    generate(str(tmp_path / "data"), 200, files=1, vocab=50, seed=0)
    (tmp_path / "job.toml").write_text(
        '[data]\ntrain = ["data"]\n[[feature]]\nname = "C1"\n[trainer]\noutput_dir = "out"\n'
    )
    job = Job(load_config(str(tmp_path / "job.toml")))
    assert all(t.option.initializer == DEFAULT_INITIALIZER for t in job.model.tables())
