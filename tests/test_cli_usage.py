"""The `recis` command as a user meets it: packaging (`python -m recis`, the
declared dependencies, Python 3.10's TOML parser), `--help`, exit codes,
`--set` / `--print-config`, the demo's work directory, and the checks a job
makes of its columns before it trains."""

import ast
import re
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


# ---------------------------------------------------------------------------
# A tiny job: 256 rows, DeepFM of width 4, four steps.

JOB = """
[data]
train = ["part-00000.orc"]
dense = ["I1"]
batch_size = 64

[model]
name = "deepfm"
dim = 4
hidden = [8]

[[feature]]
name = "C1"
[[feature]]
name = "C2"
{feature}
[trainer]
output_dir = "out"
log_every_steps = 2
"""


def tiny_job(d, feature="", **replace):
    """A job.toml in ``d`` over one ORC file of 256 rows: label, I1 (float),
    C1 and C2 (int64 ids), S1 (strings) and F1 (floats); ``feature``: more
    [[feature]] text; ``replace``: {old: new} edits of the text."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.orc as po

    rng = np.random.default_rng(0)
    n = 256
    po.write_table(
        pa.table(
            {
                "label": rng.integers(0, 2, n),
                "I1": rng.random(n),
                "C1": rng.integers(0, 50, n),
                "C2": rng.integers(0, 50, n),
                "S1": [f"s{i % 7}" for i in range(n)],
                "F1": rng.random(n).astype(np.float32),
            }
        ),
        d / "part-00000.orc",
    )
    text = JOB.format(feature=feature)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    (d / "job.toml").write_text(text)
    return str(d / "job.toml")


def run_main(capsys, *argv):
    """(exit status, stderr) of ``recis ARGV`` in this process; argparse's
    own refusals (SystemExit) count as their status."""
    from recis.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------
# Exit status: 0 done, 1 a failure handled, 2 usage, 3 a hung rank


def test_exit_status_0_1_2_and_3_are_distinct():
    from recis import cli
    from recis.distributed import watchdog

    assert (cli.EXIT_FAILED, cli.EXIT_USAGE, watchdog.EXIT_HUNG) == (1, 2, 3)


def test_a_job_that_trains_exits_0(tmp_path, capsys):
    code, err = run_main(capsys, "train", "--config", tiny_job(tmp_path))
    assert code == 0, err
    assert (tmp_path / "out" / "checkpoints" / "latest").exists()


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"log_every_steps = 2": "log_every_steps = 2\nepoch = 1"}, r"\[trainer\]: unknown field\(s\) \['epoch'\]"),
        ({"log_every_steps = 2": "keep_checkpoints = 0"}, r"\[trainer\]\.keep_checkpoints: must be >= 1, got 0"),
        ({"batch_size = 64": "batch_size = 0"}, r"\[data\]\.batch_size: must be >= 1, got 0"),
        ({"dim = 4": "dim = 0"}, r"\[model\]\.dim: expected an int >= 1, got 0"),
        ({'dense = ["I1"]': "", 'name = "deepfm"': 'name = "dlrm"', "hidden = [8]": ""}, r"\[model\] \(dlrm\): "),
        (
            {"log_every_steps = 2": 'sparse_update = "in_backward"\ngradient_accumulation_steps = 2'},
            r'\[trainer\]\.sparse_update: "in_backward" does not go with gradient_accumulation_steps > 1',
        ),
    ],
)
def test_a_bad_config_is_a_usage_error(tmp_path, capsys, replace, message):
    code, err = run_main(capsys, "train", "--config", tiny_job(tmp_path, **replace))
    assert code == 2, err
    assert err.startswith(f"recis train: {tmp_path / 'job.toml'}") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    code, err = run_main(capsys, "datagen", "-o", str(tmp_path), "--rows", "0")
    assert code == 2 and "argument --rows: must be >= 1, got 0" in err, err
    code, err = run_main(capsys, "demo", "--seed", "-1")
    assert code == 2 and "argument --seed: must be in [0, 2**63), got -1" in err, err
    code, err = run_main(capsys, "convert", "x.csv", "-o", str(tmp_path), "--format", "csv", "--schema", "a:decimal")
    assert code == 2 and "argument --schema: 'a:decimal' must be name:type" in err, err
    code, err = run_main(capsys, "train", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and f"{tmp_path / 'missing.toml'}: cannot read" in err, err


def test_a_bad_collective_timeout_in_the_environment_is_a_usage_error(tmp_path, capsys, monkeypatch):
    path = tiny_job(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before joining a process group
    monkeypatch.setenv("RECIS_COLLECTIVE_TIMEOUT", "soon")
    code, err = run_main(capsys, "train", "--config", path)
    assert code == 2 and "$RECIS_COLLECTIVE_TIMEOUT='soon': expected seconds" in err, err


def test_data_and_checkpoint_failures_exit_1_with_one_line(tmp_path, capsys):
    path = tiny_job(tmp_path, **{'name = "C2"': 'name = "C2"\ncolumn = "C99"'})
    code, err = run_main(capsys, "train", "--config", path)
    assert code == 1, err
    assert err.startswith(f'recis train: {tmp_path / "part-00000.orc"}: column "C99" not found'), err
    assert err.count("\n") == 1, err
    code, err = run_main(capsys, "inspect", str(tmp_path / "nowhere"))
    assert (code, err) == (1, f"recis inspect: {tmp_path / 'nowhere'}: no such checkpoint directory\n")
    code, err = run_main(
        capsys, "eval", "--config", tiny_job(tmp_path, **{"batch_size = 64": 'eval = ["part-00000.orc"]'})
    )
    assert (code, err) == (1, f"recis eval: {tmp_path / 'out' / 'checkpoints'}: no checkpoint to evaluate\n")


def test_a_bug_is_not_swallowed(tmp_path, capsys, monkeypatch):
    import recis.config
    import recis.framework
    from recis.cli import main

    def bug(*args, **kw):
        raise KeyError("a bug")

    monkeypatch.setattr(recis.framework, "inspect_checkpoint", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["inspect", str(tmp_path)])
    path = tiny_job(tmp_path)

    def value_bug(*args, **kw):
        raise ValueError("another bug")

    monkeypatch.setattr(recis.config, "Job", value_bug)
    with pytest.raises(ValueError, match="another bug"):
        main(["train", "--config", path])


def test_the_command_line_exit_status_and_message(tmp_path):
    path = tiny_job(tmp_path, **{"log_every_steps = 2": "epoch = 1"})
    done = recis("train", "--config", path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"recis train: {path}: [trainer]: unknown field(s) ['epoch'] (known: "), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------
# --help


def subcommands():
    import argparse

    from recis.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_states_its_default_in_its_help():
    import argparse

    seen = 0
    for name, parser in subcommands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            where = f"recis {name} {action.option_strings[0]}"
            assert action.help, f"{where}: no help text"
            text = formatter._expand_help(action)
            if action.required:
                assert "(required)" in text, (where, text)
            elif action.default is None or isinstance(action.default, bool):
                assert "(default: " in text, (where, text)  # in words: none, off, the job's latest, ...
            else:
                assert f"(default: {action.default})" in text, (where, text)
            seen += 1
    assert seen >= 30, seen


def test_help_of_each_subcommand_prints(capsys):
    for name in subcommands():
        code, _ = run_main(capsys, name, "--help")
        assert code == 0, name


# ---------------------------------------------------------------------------
# --set and --print-config


def test_set_values_read_as_toml_and_bare_words_as_strings():
    from recis.config import _toml_value

    cases = {
        "3": 3,
        "1e-3": 0.001,
        "true": True,
        '"sgd"': "sgd",
        "sgd": "sgd",
        '["a.orc", "b.orc"]': ["a.orc", "b.orc"],
        "runs/x": "runs/x",
        "": "",
        "a = 1": "a = 1",
    }
    assert {text: _toml_value(text) for text in cases} == cases


def test_toml_written_reads_back():
    from recis.config import _toml

    for value in ['a "quoted" \\ path\n\ttab \x01 \x7f é 😀', 0.001, 1e-300, float("inf"), -3, True, ["x", [1, 2.5]]]:
        assert tomllib.loads(f"v = {_toml(value)}")["v"] == value, value


def test_print_config_shows_every_field_after_set_and_reloads_the_same(tmp_path, capsys):
    from dataclasses import replace

    from recis.cli import main
    from recis.config import load_config, model_arguments

    path = tiny_job(tmp_path, **{"log_every_steps = 2": "log_every_steps = 2\nkeep_checkpoints = 0"})
    sets = [
        "trainer.epochs=3",
        "trainer.keep_checkpoints=2",  # set before the check: the file's 0 alone is refused
        'optimizer.dense="sgd"',
        "optimizer.sparse=adagrad",
        'data.train=["part-00000.orc", "more"]',
        "feature.C2.combiner=mean",
        "model.hidden=[4, 4]",
    ]
    argv = ["train", "--config", path, "--print-config", "--collective-timeout", "45"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # printed, nothing trained
    printed = tomllib.loads(out)
    assert printed["trainer"]["epochs"] == 3 and printed["trainer"]["keep_checkpoints"] == 2
    assert printed["trainer"]["collective_timeout"] == 45
    assert printed["trainer"]["output_dir"] == str(tmp_path / "out")  # paths absolute
    assert printed["optimizer"] == {
        "dense": "sgd",
        "dense_lr": 0.001,
        "dense_weight_decay": 0.0,
        "sparse": "adagrad",
        "sparse_lr": 0.001,
        "sparse_weight_decay": 0.0,
        "schedule": "constant",
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,
    }  # the optimizers' own hyper-parameter defaults: not set
    assert "# dense_betas: not set" in out and "# sparse_eps: not set" in out
    assert printed["data"]["train"] == [str(tmp_path / "part-00000.orc"), str(tmp_path / "more")]
    assert printed["data"]["num_threads"] == 2 and "group" not in printed["data"]  # a default; unset
    assert "# group: not set" in out
    assert [f["combiner"] for f in printed["feature"]] == ["sum", "mean"]
    assert [f["column"] for f in printed["feature"]] == ["C1", "C2"]  # defaults filled in
    assert printed["model"] == {
        "name": "deepfm",
        "dim": 4,
        "hidden": [4, 4],
        "coalesce": True,
        "dropout": 0.0,
        "batch_norm": False,
    }
    # The printed config, loaded from elsewhere, is the same job.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "job.toml").write_text(out)
    want, got = load_config(path, sets), load_config(str(other / "job.toml"))
    want.trainer.collective_timeout = 45
    want.features = [replace(f, column=f.column or f.name) for f in want.features]
    assert (got.data, got.features, got.optimizer, got.trainer) == (
        want.data,
        want.features,
        want.optimizer,
        want.trainer,
    )
    assert model_arguments(got.model) == model_arguments(want.model)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("trainr.epochs=3", r"job\.toml: unknown section\(s\) \['trainr'\] \(known: data, feature"),
        ("trainer.epoch=3", r"job\.toml: \[trainer\]: unknown field\(s\) \['epoch'\] \(known: "),
        ("trainer.epochs=three", r"job\.toml: \[trainer\]\.epochs: expected int, got 'three'"),
        ("data.train=a.orc", r"job\.toml: \[data\]\.train: expected list\[str\], got 'a\.orc'"),
        ("optimizer.dense=sgdd", r"\[optimizer\]\.dense: 'sgdd' is not one of"),
        ("model.hiden=[3]", r"\[model\] unknown field\(s\) \['hiden'\] for deepfm"),
        (
            "feature.C9.hash=true",
            r"job\.toml: --set feature\.C9\.hash: no \[\[feature\]\] is named 'C9' \(known: \['C1', 'C2'\]\)",
        ),
        ("feature.C1.colour=1", r"\[\[feature\]\] #1 \(C1\): unknown field\(s\) \['colour'\]"),
        ("feature.hash=true", r"--set 'feature\.hash=true': a feature's field is set as feature\.NAME\.key=value"),
        ("epochs=3", r"--set 'epochs=3': expected section\.key=value"),
        ("trainer.epochs", r"--set 'trainer\.epochs': expected section\.key=value"),
        ("trainer.a.b=1", r"\[trainer\]'s fields are one level deep"),
    ],
)
def test_a_bad_set_is_the_usage_error_the_file_would_get(tmp_path, capsys, setting, message):
    path = tiny_job(tmp_path)
    for cmd in ("train", "eval"):
        code, err = run_main(capsys, cmd, "--config", path, "--set", setting, "--print-config")
        assert code == 2, (cmd, err)
        assert err.startswith(f"recis {cmd}: ") and err.count("\n") == 1, err
        assert re.search(message, err), err


def test_set_reaches_the_training_run(tmp_path, capsys):
    path = tiny_job(tmp_path)
    code, err = run_main(capsys, "train", "--config", path, "--set", "trainer.max_steps=2", "--set", "data.seed=3")
    assert code == 0, err
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "ckpt-2"


# ---------------------------------------------------------------------------
# recis demo --workdir: its own outputs only

TINY_DEMO = ["--rows", "2000", "--vocab", "200", "--batch-size", "256", "--log-every", "3", "--eval-every", "3"]


def test_demo_marks_its_workdir_and_a_rerun_replaces_its_outputs(tmp_path, capsys):
    workdir = tmp_path / "fresh"
    code, err = run_main(capsys, "demo", "--workdir", str(workdir), *TINY_DEMO)
    assert code == 0, err
    assert (workdir / ".recis-demo").is_file() and (workdir / "checkpoints" / "latest").exists()
    # A later run: the marker is there, so the previous outputs go and the data stays.
    from recis.cli import prepare_demo_workdir

    data = sorted(p.name for p in (workdir / "data").iterdir())
    (workdir / "checkpoints" / "mine").write_text("x")
    prepare_demo_workdir(str(workdir))
    assert sorted(p.name for p in workdir.iterdir()) == [".lock", ".recis-demo", "data"]
    assert sorted(p.name for p in (workdir / "data").iterdir()) == data
    # An empty directory becomes the demo's.
    (tmp_path / "empty").mkdir()
    prepare_demo_workdir(str(tmp_path / "empty"))
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [".recis-demo"]


def test_demo_refuses_a_workdir_with_outputs_it_did_not_write(tmp_path, capsys):
    for name, make in [("checkpoints", lambda p: (p.mkdir(), (p / "ckpt-7").mkdir())), ("log.jsonl", Path.touch)]:
        workdir = tmp_path / name.replace(".", "-")
        workdir.mkdir()
        make(workdir / name)
        before = sorted(str(p) for p in workdir.rglob("*"))
        code, err = run_main(capsys, "demo", "--workdir", str(workdir), *TINY_DEMO)
        assert code == 2, err
        assert err.startswith(f"recis demo: {workdir} holds {name} but no .recis-demo"), err
        assert "pick another --workdir, or remove that directory" in err and err.count("\n") == 1, err
        assert sorted(str(p) for p in workdir.rglob("*")) == before  # untouched


# ---------------------------------------------------------------------------
# A feature's column: integer ids, or strings it hashes


@pytest.mark.parametrize(
    "column, kind, fix",
    [
        ("S1", "string", "set hash = true to hash the strings to ids"),
        ("F1", "float32", "write the column as int64 (or as strings, with hash = true), or read it as a [data] dense"),
    ],
)
def test_a_feature_on_a_string_or_float_column_without_hash_is_refused_before_training(
    tmp_path, capsys, column, kind, fix
):
    path = tiny_job(tmp_path, feature=f'[[feature]]\nname = "{column}"\n')
    for cmd in ("train", "eval"):
        argv = [cmd, "--config", path] + (["--set", 'data.eval=["part-00000.orc"]'] if cmd == "eval" else [])
        code, err = run_main(capsys, *argv)
        assert code == 2, err
        want = f"{path}: [[feature]] '{column}': column '{column}' of {tmp_path / 'part-00000.orc'} is {kind}, "
        assert err.startswith(f"recis {cmd}: {want}and a feature takes integer ids: {fix}"), err
        assert err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()  # before the trainer, before any step


def test_hash_true_reads_a_string_column_and_bucket_needs_it(tmp_path, capsys):
    path = tiny_job(tmp_path, feature='[[feature]]\nname = "S1"\nhash = true\nbucket = 1000\n')
    code, err = run_main(capsys, "train", "--config", path)
    assert code == 0, err
    code, err = run_main(capsys, "train", "--config", path, "--set", "feature.S1.hash=false")
    assert code == 2, err
    assert f"{path}: [[feature]] #3 (S1).bucket: 1000 without hash = true" in err, err
    assert "set hash = true, or remove bucket" in err, err
