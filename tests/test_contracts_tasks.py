"""The implicit contracts made explicit: every task implements tasks.Task with its signatures, every eval.py
back-end is a backends.Backend whose flags come from the registry, and one reader refuses what is not the
speaker-HDF5 layout for both training and evaluation."""

import argparse
import inspect

import h5py
import numpy as np
import pytest

import data_load
import eval as eval_script
from e2e_verification import backends, speech_data, tasks
from e2e_verification.scoring import SCORERS
from utils import UserError


def abstract_methods(base):
    return sorted(base.__abstractmethods__)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_task_implements_every_method_with_the_base_signature(name):
    task = tasks.TASKS[name]
    assert isinstance(task, tasks.Task)
    assert not type(task).__abstractmethods__
    assert "embed_cohort" in abstract_methods(tasks.Task) and len(abstract_methods(tasks.Task)) >= 10
    for method in abstract_methods(tasks.Task):
        own = getattr(type(task), method)
        assert own is not getattr(tasks.Task, method), f"{name} does not implement {method}"
        assert inspect.signature(own) == inspect.signature(getattr(tasks.Task, method)), (name, method)


def test_both_tasks_implement_the_same_public_methods():
    """A method one task has and the base lacks would be a domain branch in disguise (SpeechTask's check_frontend
    is its helper, called only from its own methods)."""
    declared = set(abstract_methods(tasks.Task))
    for task in tasks.TASKS.values():
        extra = {n for n, v in vars(type(task)).items() if inspect.isfunction(v) and not n.startswith("_")}
        assert extra - declared <= {"check_frontend"}


def test_task_cannot_be_half_implemented():
    class Half(tasks.Task):
        def resolve(self, args, given):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Half("image", "--data-path", "--valid-data-path")


@pytest.mark.parametrize("backend", backends.BACKENDS, ids=lambda b: b.__name__)
def test_backend_implements_the_base(backend):
    assert issubclass(backend, backends.Backend) and not backend.__abstractmethods__
    for method in abstract_methods(backends.Backend):
        own = inspect.getattr_static(backend, method)
        base = inspect.getattr_static(backends.Backend, method)
        assert inspect.signature(getattr(backend, method)) == inspect.signature(getattr(backends.Backend, method))
        assert own is not base, (backend.__name__, method)
    flags = [flag for flag, _ in backend.flags]
    assert flags and set(backend.input_flags) <= set(flags)


def test_eval_backend_flags_come_from_the_registry():
    """eval.py's back-end flags are the registry's, in its order, just before --allow-other-model."""
    parser = eval_script.build_parser()
    options = [a.option_strings[0] for a in parser._actions]
    registry = [flag for backend in backends.BACKENDS for flag, _ in backend.flags]
    start = options.index(registry[0])
    assert options[start : start + len(registry) + 1] == [*registry, "--allow-other-model"]
    assert backends.input_flags() == ["--calibration", "--cohort", "--plda", "--distance"]


def test_no_backend_flag_builds_no_backend():
    args = eval_script.build_parser().parse_args(["--cp-path", "x.pt"])
    run = backends.Backends.from_args(args)
    assert run.backends == [] and run.raw_names() == [s.name for s in SCORERS]


def test_calibration_is_built_last_and_reads_the_others_columns(tmp_path):
    """A calibration of the `plda` column loads only because PLDA is built before it, whatever BACKENDS' order."""
    import json

    from e2e_verification.plda import PLDA

    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((40, 4)), np.repeat(np.arange(8), 5)
    plda_path = str(tmp_path / "plda.json")
    PLDA().fit(x, labels).save(plda_path)
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"p_target": 0.01, "calibrations": {"plda": {"a": 1.0, "b": 0.0}}, "fusions": {}}))
    args = eval_script.build_parser().parse_args(["--cp-path", "x.pt", "--plda", plda_path, "--calibration", str(cal)])
    run = backends.Backends.from_args(args)
    assert [type(b).__name__ for b in run.backends] == ["Plda", "Calibration"]
    assert run.raw_names()[-2:] == ["plda", "cal_plda"]


def write_h5(path, build):
    with h5py.File(path, "w") as h5:
        h5.attrs["ncoef"] = 3
        build(h5)
    return str(path)


def utterance(group, name):
    group.create_dataset(name, data=np.ones((3, 10), np.float32))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda h5: utterance(h5, "u0"), "`u0` at the root is a Dataset, not a speaker group"),
        (lambda h5: h5.create_group("s0").create_group("u0"), "`s0/u0` is a Group, not an utterance"),
    ],
    ids=["dataset-at-root", "group-in-speaker"],
)
def test_one_reader_refuses_what_is_not_the_layout_for_training_and_evaluation(tmp_path, build, message):
    def layout(h5):
        utterance(h5.create_group("s1"), "s1-0")
        build(h5)

    path = write_h5(tmp_path / "bad.h5", layout)
    with pytest.raises(UserError, match=message):
        data_load.read_speaker_index(path)
    with pytest.raises(UserError, match=message):
        list(speech_data.iter_features(path))


def test_one_reader_gives_both_views(tmp_path):
    def layout(h5):
        for spk in ("b", "a"):
            group = h5.create_group(spk)
            for i in (1, 0):
                utterance(group, f"{spk}-{i}")
        h5.create_group("empty")

    path = write_h5(tmp_path / "good.h5", layout)
    speakers, utts, ncoef = data_load.read_speaker_index(path)
    assert speakers == ["a", "b"] and utts == {"a": ["a-0", "a-1"], "b": ["b-0", "b-1"]} and ncoef == 3
    with h5py.File(path, "r") as h5:
        assert speech_data._hdf5_index(h5, path) == {"a-0": "a", "a-1": "a", "b-0": "b", "b-1": "b"}
    assert [utt for utt, _ in speech_data.iter_features(path)] == ["a-0", "a-1", "b-0", "b-1"]


def test_argparse_namespace_is_all_a_backend_reads():
    """Back-ends read only their own flags (and --allow-other-model) from the namespace."""
    ns = argparse.Namespace(
        calibration=None, cohort=None, cohort_top_n=300, plda=None, distance=None, allow_other_model=False
    )
    assert backends.Backends.from_args(ns).backends == []
