"""The named recipes (recipes/*.args): each line a flag and its value, every flag one of train.py's, and the
benches that read them pass train.py the very flags they passed when the recipes were lists in the code."""

import glob
import importlib
import os
import shlex

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[: -len(".args")] for p in glob.glob(os.path.join(ROOT, "recipes", "*.args")))

# The recipes as the benches held them before they moved to recipes/ (benchlib.IMAGE_RECIPE, accuracy.SPEECH_RECIPE).
OLD_IMAGE = ["--model", "resnet", "--width", "16", "--batch-size", "64", "--lr", "0.05", "--l2", "1e-4"]
OLD_IMAGE += ["--softmax", "am_softmax", "--smoothing", "0.05", "--hidden-size", "256", "--n-hidden", "2"]
OLD_IMAGE += ["--dropout-prob", "0.01", "--valid-max-items", "600", "--patience", "3", "--max-gnorm", "5"]
OLD_SPEECH = ["--model", "TDNN", "--max-gnorm", "20", "--batch-size", "8", "--valid-batch-size", "32"]
OLD_SPEECH += ["--lr", "0.5", "--momentum", "0.85", "--l2", "1e-5", "--warmup", "50", "--ncoef", "30"]
OLD_SPEECH += ["--n-frames", "150", "--latent-size", "256", "--hidden-size", "256", "--n-hidden", "2"]
OLD_SPEECH += ["--dropout-prob", "0.01", "--softmax", "am_softmax", "--smoothing", "0.05", "--workers", "0"]


@pytest.fixture
def benchlib(monkeypatch):
    """bench/benchlib.py, imported as the bench scripts import it."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    return importlib.import_module("benchlib")


@pytest.fixture
def accuracy(monkeypatch):
    """experiments/accuracy.py, imported as when it runs as a script."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    return importlib.import_module("accuracy")


def test_the_bench_recipes_are_there():
    assert {"image_small", "asterisk_tdnn"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_each_line_is_a_flag_and_its_value(name):
    with open(os.path.join(ROOT, "recipes", name + ".args")) as handle:
        for line in handle:
            words = shlex.split(line, comments=True)
            assert not words or (len(words) <= 2 and words[0].startswith("--")), f"{name}.args: {line!r}"


@pytest.mark.parametrize("name", RECIPES)
def test_every_flag_is_train_py_s_and_at_file_reads_the_same(name, benchlib, monkeypatch):
    """`python train.py @recipes/<name>.args` (argparse's fromfile, a line split as the shell splits it) parses
    as the recipe's list does, and every flag is one of train.py's."""
    words = benchlib.recipe(name)
    parser = train.build_parser()
    parsed = parser.parse_args(words)
    parser.fromfile_prefix_chars = "@"
    parser.convert_arg_line_to_args = lambda line: shlex.split(line, comments=True)
    monkeypatch.chdir(ROOT)
    assert parser.parse_args([f"@recipes/{name}.args"]) == parsed


@pytest.mark.parametrize("name", RECIPES)
def test_the_readme_lists_each_recipe(name):
    with open(os.path.join(ROOT, "recipes", "README.md")) as handle:
        assert f"@recipes/{name}.args" in handle.read()


def test_the_recipes_are_the_lists_the_benches_held(benchlib, accuracy):
    assert benchlib.IMAGE_RECIPE == OLD_IMAGE
    assert accuracy.SPEECH_RECIPE == OLD_SPEECH


def captured_runs(accuracy, monkeypatch):
    """accuracy.py's subprocess runs replaced by a list of their argument lists (and no scoring)."""
    runs = []
    monkeypatch.setattr(accuracy, "python", lambda script, *argv, threads: runs.append([script, *argv]))
    monkeypatch.setattr(accuracy, "evaluate", lambda folder, cp, test, args: runs.append(["eval", *test]))
    return runs


KEPT = ["--keep-checkpoints", "0", "--verbose", "0"]  # accuracy.py keeps every epoch to choose one


def test_fonts_runs_pass_train_py_the_recipe_and_score_unseen_families(accuracy, benchlib, monkeypatch, tmp_path):
    runs, run = captured_runs(accuracy, monkeypatch), str(tmp_path)
    args = accuracy.build_parser().parse_args(["--fonts", "F", "--image-epochs", "4", "--font-test-items", "7"])
    accuracy.run_fonts(run, 2, "sym", args)
    expected = ["train.py", *benchlib.recipe("image_noaug"), "--epochs", "4", "--seed", "2"]
    expected += [
        "--data-path",
        "F/train",
        "--valid-data-path",
        "F/valid",
        "--checkpoint-path",
        os.path.join(run, "cp"),
    ]
    assert runs[0] == expected + KEPT + ["--pair-features", "sym"]
    assert runs[1] == ["eval", "--data-path", "F/test", "--items-per-class", "7"]


def test_open_image_protocols_validate_on_classes_neither_trained_nor_tested(accuracy, monkeypatch, tmp_path):
    runs = captured_runs(accuracy, monkeypatch)
    args = accuracy.build_parser().parse_args([])
    accuracy.run_digits(str(tmp_path), 1, "concat", args, open_set=True)
    accuracy.run_fmnist(str(tmp_path), 1, "cos", args, open_set=True)
    for train_run, test_run in (runs[:2], runs[2:]):
        chosen = {flag: train_run[train_run.index(flag) + 1] for flag in ("--classes", "--valid-classes")}
        tested = test_run[test_run.index("--classes") + 1]
        assert (chosen["--classes"], chosen["--valid-classes"], tested) == ("0-4", "5-6", "7-9")


def test_asterisk_runs_pass_train_py_the_same_flags(accuracy, monkeypatch, tmp_path):
    runs, run = captured_runs(accuracy, monkeypatch), str(tmp_path)
    monkeypatch.setattr(accuracy, "asterisk_fold", lambda args, fold: "D")
    args = accuracy.build_parser().parse_args(["--speech-epochs", "3", "--speech-flags=--specaug"])
    accuracy.run_asterisk(run, 5, "concat", args)
    expected = ["train.py", *OLD_SPEECH, "--epochs", "3", "--seed", "1"]
    expected += ["--train-hdf-file", "D/train.hdf", "--valid-hdf-file", "D/valid.hdf", "--specaug"]
    assert runs[0] == expected + ["--checkpoint-path", os.path.join(run, "cp")] + KEPT
    assert runs[1] == ["eval", "--test-data", "D/test_feats/feats.scp", "--trials-path", "D/test/trials"]


def test_train_reads_a_recipe_file_and_sees_its_flags_as_typed(tmp_path, benchlib):
    """`python train.py @recipes/x.args --epochs 3`: the recipe's flags are expanded before train.py looks at
    which flags were typed (so the digits demo's defaults never override them), and parse as if typed."""
    from utils import UserError

    parser = train.build_parser()
    argv = parser.expand_arg_files([f"@{os.path.join(ROOT, 'recipes', 'image_small.args')}", "--epochs", "3"])
    assert argv == [*benchlib.recipe("image_small"), "--epochs", "3"]
    args = parser.parse_args(argv)
    assert (args.model, args.width, args.softmax, args.epochs) == ("resnet", 16, "am_softmax", 3)
    with pytest.raises(UserError, match="No such file"):
        parser.parse_args(parser.expand_arg_files([f"@{tmp_path / 'missing.args'}"]))


# The digits demo's defaults as tasks.py held them before they moved to recipes/digits.args.
OLD_DIGITS = {"epochs": 20, "batch_size": 100, "lr": 0.05, "softmax": "am_softmax", "smoothing": 0.05,
              "hidden_size": 350, "n_hidden": 3, "dropout_prob": 0.01, "checkpoint_path": "runs/digits",
              "keep_checkpoints": 1}  # fmt: skip


def resolved(argv):
    from e2e_verification import training

    return vars(training.resolve_defaults(training.build_parser().parse_args(argv), argv))


def test_the_digits_demo_defaults_are_its_recipe_and_a_typed_flag_wins():
    demo = resolved([])
    assert {k: demo[k] for k in OLD_DIGITS} == OLD_DIGITS
    assert all(type(demo[k]) is type(v) for k, v in OLD_DIGITS.items())
    typed = resolved(["--epochs", "3", "--lr=0.2", "--softmax", "softmax"])
    assert (typed["epochs"], typed["lr"], typed["softmax"], typed["batch_size"]) == (3, 0.2, "softmax", 100)
    other = resolved(["--data-path", "somewhere"])  # not the demo: the recipe is not applied
    assert other["batch_size"] != 100 and other["hidden_size"] == 512
