"""The hyperparameter search: hp_space.py (spaces, the 27 submit arguments, the trial log and its
replay), hp_search.py on images (the seed's command line, a failed trial, kill and resume),
train_hp.py, and hp_search_slurm.py through the real Slurm and Grid Engine daemons."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from PIL import Image

import hp_search
import hp_search_slurm
import models
import train_hp
from e2e_verification import hp_space, training
from utils import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "run_hp_args.txt")
NCOEF = 30

SEED_SUBMIT_VALUES = dict(
    lr=1.5, l2=1e-05, momentum=0.85, smoothing=0.1, warmup=2000, latent_size=512, n_hidden=4, hidden_size=256,
    n_frames=800, model="TDNN", ndiscriminators=1, rproj_size=-1, ncoef=30, dropout_prob=0.01, epochs=6,
    batch_size=24, valid_batch_size=24, workers=6, cuda=True, train_hdf_file="/data/train.hdf",
    valid_hdf_file="/data/test.hdf", out_file="/tmp/temp_vox/trial_0003-0a1b2c3d.objective",
    checkpoint_path="/path/to/cp", cp_name="trial_0003.pt", softmax="am_softmax", max_gnorm=20.0, logdir=None,
)  # fmt: skip


def events(folder):
    with open(os.path.join(folder, hp_space.LOG_NAME)) as handle:
        return [json.loads(line) for line in handle]


def ends(folder):
    return {e["trial"]: e for e in events(folder) if e["event"] == "end"}


# ----------------------------------------------------------------------------- the 27 submit arguments


def test_submit_args_match_the_golden_rendering():
    with open(GOLDEN) as handle:
        golden = [line.rstrip("\n").split("\t") for line in handle if not line.startswith("#")]
    rendered = hp_space.submit_args(SEED_SUBMIT_VALUES)
    assert [(int(n), field, value) for n, field, value in golden] == [
        (i, f, v) for i, (f, v) in enumerate(zip(hp_space.SUBMIT_FIELDS, rendered), 1)
    ]


@pytest.mark.parametrize("script", ["run_hp_slurm.sh", "run_hp_sge.sh"])
def test_submit_scripts_pass_position_n_as_the_seed_flag_train_hp_parses(script):
    with open(os.path.join(REPO, script)) as handle:
        pairs = re.findall(r'(--[a-z0-9-]+) "\$\{(\d+)\}"', handle.read())
    assert [int(n) for _, n in pairs] == list(range(1, 28))
    assert [flag for flag, _ in pairs] == ["--" + f.replace("_", "-") for f in hp_space.SUBMIT_FIELDS]
    argv = [item for (flag, _), value in zip(pairs, hp_space.submit_args(SEED_SUBMIT_VALUES)) for item in (flag, value)]
    args = train_hp.build_parser().parse_args(argv)
    assert args.lr == 1.5 and args.cuda is True and args.rproj_size == -1 and args.logdir == "None"
    assert args.out_file == SEED_SUBMIT_VALUES["out_file"] and args.cp_name == "trial_0003.pt"


def test_cluster_command_is_an_argument_list(tmp_path):
    base = training.build_parser().parse_args([])
    for scheduler, head in (("slurm", ["sbatch", "--wait"]), ("sge", ["qsub", "-sync", "y"])):
        runner = hp_search_slurm.ClusterTrials(scheduler, "/x/run.sh", str(tmp_path), {}, base, None)
        cmd = runner.command(3, SEED_SUBMIT_VALUES, "/t/trial.log")
        assert cmd[: len(head)] == head and "hp_trial_3" in " ".join(cmd)
        assert cmd[-28:] == ["/x/run.sh", *hp_space.submit_args(SEED_SUBMIT_VALUES)]


# ----------------------------------------------------------------------------- spaces and command lines


def test_spaces_hold_only_what_applies_to_the_data_kind():
    image, _ = hp_space.resolve_base([])
    spec = hp_space.space_spec(image)
    assert {"lr", "l2", "momentum", "patience", "n_hidden", "hidden_size", "dropout_prob", "softmax"} <= set(spec)
    assert not {"warmup", "latent_size", "n_frames", "max_gnorm", "model", "rproj"} & set(spec)
    assert spec["lr"][0] == "log" and spec["l2"][0] == "log"
    noam, search_models = hp_space.resolve_base(["--lr-schedule", "noam", "--model", "all"])
    spec = hp_space.space_spec(noam, search_models, rproj=True, only=hp_space.SUBMIT_FIELDS)
    assert "warmup" in spec and "patience" not in spec and spec["rproj"][1] == hp_space.RPROJ_FRACTIONS
    assert spec["model"] == ["choice", models.encoder_names("image")] and "resnet" in spec["model"][1]
    assert set(hp_space.SPEECH_SPACE) >= {"warmup", "latent_size", "n_frames", "max_gnorm"}


def test_rproj_fraction_is_of_the_learned_distance_input():
    base = training.build_parser().parse_args([])
    base.model = "resnet"
    values = hp_space.training_values({"rproj": 0.5, "lr": np.float64(0.1)}, base)
    assert values == {"rproj_size": 512, "lr": 0.1}  # half of [a; b], 2 x 512
    assert hp_space.training_values({"rproj": -1}, base) == {"rproj_size": -1}


def test_training_argv_drops_only_search_flags():
    parser, own = hp_search_slurm.build_parser()
    argv = ["--budget", "3", "--lr", "0.1", "--hp-workers=2", "--rproj", "--rproj-size", "-1", "--sub-file", "x.sh"]
    assert hp_space.training_argv(argv, own) == ["--lr", "0.1", "--rproj-size", "-1"]
    with pytest.raises(UserError, match="--data-path"):
        hp_search_slurm.check_carried(["--data-path", "/d", "--seed", "2", "--epochs", "3"])
    with pytest.raises(UserError, match="validation"):
        hp_space.resolve_base(["--data-path", REPO])


# ----------------------------------------------------------------------------- the driver and its log


def objective(params):
    return (math.log10(params["lr"]) + 2) ** 2 + params["momentum"] + params["n_hidden"] / 10


def toy_search(folder, budget, workers, run_trial, optimizer="NGOpt"):
    spec = {k: hp_space.IMAGE_SPACE[k] for k in ("lr", "momentum", "n_hidden", "softmax")}
    header = {"script": "test", "space": spec, "optimizer": optimizer, "workers": workers, "budget": budget}
    opt = hp_space.make_optimizer(optimizer, spec, budget, workers, seed=3)
    return hp_space.run_search(hp_space.TrialLog(folder), header, opt, budget, workers, run_trial)


@pytest.mark.parametrize("optimizer", ["NGOpt", "RandomSearch"])
def test_resumed_search_asks_what_an_uninterrupted_one_asks(tmp_path, optimizer):
    calls = []

    def run(trial, params):
        calls.append(trial)
        if trial == 3 and calls.count(3) == 1:
            raise KeyboardInterrupt  # the search is stopped while trial 3 runs
        return {"status": "ok", "objective": objective(params)}

    with pytest.raises(KeyboardInterrupt):
        toy_search(str(tmp_path / "a"), 8, 1, run, optimizer)
    best = toy_search(str(tmp_path / "a"), 8, 1, run, optimizer)
    assert calls == [0, 1, 2, 3, 3, 4, 5, 6, 7]  # only the unfinished trial runs again
    whole = toy_search(str(tmp_path / "b"), 8, 1, lambda t, p: {"status": "ok", "objective": objective(p)}, optimizer)
    starts = [[e["params"] for e in events(tmp_path / d) if e["event"] == "start"] for d in "ab"]
    assert starts[0] == starts[1] and len(starts[0]) == 8
    assert best == whole
    assert [e["event"] for e in events(tmp_path / "a") if e.get("trial") == 3] == ["start", "restart", "end"]


def test_parallel_failed_trials_are_told_and_the_budget_completes(tmp_path):
    def run(trial, params):
        time.sleep(0.01 * (trial % 3))
        if trial == 2:
            return {"status": "failed", "error": "boom"}
        return {"status": "ok", "objective": objective(params)}

    best = toy_search(str(tmp_path), 7, 3, run)
    done = ends(tmp_path)
    assert sorted(done) == list(range(7)) and done[2]["status"] == "failed" and done[2]["error"] == "boom"
    ok = {t: e["objective"] for t, e in done.items() if e["status"] == "ok"}
    assert best["objective"] == min(ok.values()) and all(e["duration"] >= 0 for e in done.values())
    assert json.load(open(tmp_path / hp_space.BEST_NAME)) == best


def test_cut_log_line_is_dropped_and_another_search_is_refused(tmp_path):
    log = hp_space.TrialLog(str(tmp_path))
    log.open({"script": "a", "budget": 2})
    log.append({"event": "start", "trial": 0, "params": {}})
    with open(log.path, "a") as handle:
        handle.write('{"event": "end", "tri')  # killed mid-write
    assert [e["event"] for e in log.open({"script": "a", "budget": 5})] == ["search", "start"]
    assert open(log.path).read().endswith("}\n")
    with pytest.raises(UserError, match="another script"):
        log.open({"script": "b", "budget": 2})


def test_objective_file_is_one_finite_number(tmp_path):
    path = tmp_path / "o.txt"
    with pytest.raises(UserError, match="no out-file"):
        hp_space.read_objective(path)
    path.write_text("nan\n")
    with pytest.raises(UserError):
        hp_space.read_objective(path)
    path.write_text("0.125\n")
    assert hp_space.read_objective(path) == 0.125


# ----------------------------------------------------------------------------- serial search on images


def make_image_tree(root, n_classes=5, per_class=10, seed=0):
    """A Mini-ImageNet-like tree (one folder of 8x8 PNGs per class) cut from scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        os.makedirs(os.path.join(root, f"n{c:08d}"))
        for i, k in enumerate(rng.choice(np.flatnonzero(digits.target == c), per_class, replace=False)):
            img = (digits.images[k] * 255 / 16).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"n{c:08d}", f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def mini_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini-imagenet")
    return {split: make_image_tree(str(root / split), seed=k) for k, split in enumerate(("train", "val"))}


def seed_image_argv(data, cp, budget=2, epochs=1):
    """The seed's hp_search.py command line with only --budget, --epochs and the paths changed."""
    return (
        f"--batch-size 128 --valid-batch-size 128 --model resnet --budget {budget} --checkpoint-path {cp}/ "
        f"--epochs {epochs} --data-path {data['train']} --valid-data-path {data['val']}"
    ).split()


def test_seed_image_hp_search_command_line(mini_imagenet, tmp_path, capsys):
    cp = str(tmp_path / "cp")
    assert hp_search.main(seed_image_argv(mini_imagenet, cp)) == 0
    done = ends(cp)
    assert sorted(done) == [0, 1] and all(e["status"] == "ok" for e in done.values())
    starts = {e["trial"]: e["params"] for e in events(cp) if e["event"] == "start"}
    for trial, params in starts.items():
        folder = os.path.join(cp, f"trial_{trial:04d}")
        args = json.load(open(os.path.join(folder, "args.json")))
        assert (args["batch_size"], args["valid_batch_size"], args["model"], args["epochs"]) == (128, 128, "resnet", 1)
        assert args["lr"] == params["lr"] and args["n_hidden"] == params["n_hidden"]
        assert os.path.exists(os.path.join(folder, "checkpoint_1ep.pt"))
        assert 0 <= done[trial]["objective"] <= 1
    best = json.load(open(os.path.join(cp, hp_space.BEST_NAME)))
    assert best["objective"] == min(e["objective"] for e in done.values())
    assert f"best trial {best['trial']}" in capsys.readouterr().out


def test_failed_trial_is_recorded_and_the_search_completes(mini_imagenet, tmp_path):
    cp = tmp_path / "cp"
    cp.mkdir()
    (cp / "trial_0000").write_text("a file where trial 0 wants its checkpoint folder")
    assert hp_search.main(seed_image_argv(mini_imagenet, str(cp), budget=2)) == 0
    done = ends(cp)
    assert [done[t]["status"] for t in range(2)] == ["failed", "ok"]
    assert "UserError" in done[0]["error"] and "is a file" in done[0]["error"]


def test_killed_search_resumes_without_running_a_finished_trial_again(mini_imagenet, tmp_path):
    cp = str(tmp_path / "cp")
    cmd = [sys.executable, os.path.join(REPO, "hp_search.py"), *seed_image_argv(mini_imagenet, cp, 3, 2)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        log = os.path.join(cp, hp_space.LOG_NAME)
        if os.path.exists(log) and any(e["event"] == "start" and e["trial"] == 1 for e in events(cp)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = events(cp)
    finished = {e["trial"] for e in before if e["event"] == "end"}
    unfinished = {e["trial"] for e in before if e["event"] == "start"} - finished
    assert finished == {0} and unfinished == {1}, before
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    after = events(cp)
    assert after[: len(before)] == before
    new = after[len(before) :]
    assert [e["trial"] for e in new if e["event"] in ("start", "restart")] == [1, 2]
    assert [e["event"] for e in new if e["trial"] == 1] == ["restart", "end"]
    assert sorted(e["trial"] for e in after if e["event"] == "end") == [0, 1, 2]
    assert "trial 0: train.py" not in out.stdout and "trial 1: train.py" in out.stdout


# ----------------------------------------------------------------------------- train_hp.py


def write_speakers(path, n_speakers, n_utts, seed):
    """A speaker HDF5 (group per speaker, float32 (ncoef, frames) per utterance, root attr ncoef)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        h5.attrs["ncoef"] = NCOEF
        for s in range(n_speakers):
            group = h5.create_group(f"spk{seed}{s}")
            offset = rng.normal(0, 1, (NCOEF, 1))
            for u in range(n_utts):
                frames = int(rng.integers(40, 120))
                group.create_dataset(f"u{u}", data=(offset + rng.normal(0, 1, (NCOEF, frames))).astype(np.float32))
    return str(path)


@pytest.fixture(scope="module")
def speakers(tmp_path_factory):
    root = tmp_path_factory.mktemp("speakers")
    return {"train": write_speakers(root / "train.hdf", 6, 6, 0), "valid": write_speakers(root / "test.hdf", 4, 3, 1)}


def seed_train_hp_argv(speakers, cp, out_file, logdir="None"):
    """train_hp.py as the seed's run_hp_slurm.sh calls it (27 flags), on the tiny speaker files."""
    values = dict(SEED_SUBMIT_VALUES, epochs=1, n_frames=300, workers=0, cuda=False, train_hdf_file=speakers["train"],
                  valid_hdf_file=speakers["valid"], out_file=out_file, checkpoint_path=cp, logdir=logdir)  # fmt: skip
    flags = ["--" + f.replace("_", "-") for f in hp_space.SUBMIT_FIELDS]
    return [item for pair in zip(flags, hp_space.submit_args(values)) for item in pair]


def test_train_hp_writes_its_objective_and_checkpoint(speakers, tmp_path):
    out = tmp_path / "trial.objective"
    argv = seed_train_hp_argv(speakers, str(tmp_path / "cp"), str(out), logdir=str(tmp_path / "logs"))
    assert train_hp.main(argv) == 0
    value = hp_space.read_objective(out)
    assert 0 <= value <= 1 and out.read_text() == f"{value!r}\n"
    assert sorted(os.listdir(tmp_path / "cp")) == ["args.json", "trial_0003.pt"]
    assert os.listdir(tmp_path / "logs") == ["trial_0003"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary left behind


def test_train_hp_fails_non_zero_and_writes_nothing(speakers, tmp_path):
    out = tmp_path / "trial.objective"
    (tmp_path / "cp").mkdir()
    (tmp_path / "cp" / "trial_0003.pt").mkdir()  # the checkpoint cannot be written
    with pytest.raises(OSError):
        train_hp.main(seed_train_hp_argv(speakers, str(tmp_path / "cp"), str(out)))
    assert not out.exists()
    argv = seed_train_hp_argv(speakers, str(tmp_path / "cp"), str(tmp_path / "missing" / "o.txt"))
    proc = subprocess.run([sys.executable, "train_hp.py", *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--out-file: output folder does not" in proc.stderr


# ----------------------------------------------------------------------------- real clusters


def seed_speech_argv(speakers, tmp_path, scheduler):
    """The seed's hp_search_slurm.py command line with budget 4, 2 jobs at a time, 1 epoch, test paths."""
    sub_file = {"slurm": "run_hp_slurm.sh", "sge": "run_hp_sge.sh"}[scheduler]
    argv = (
        f"--train-hdf-file {speakers['train']} --valid-hdf-file {speakers['valid']} --sub-file {sub_file} "
        f"--temp-folder {tmp_path}/temp_vox --workers 6 --batch-size 24 --valid-batch-size 24 --epochs 1 "
        f"--budget 4 --model TDNN --ncoef 30 --hp-workers 2 --checkpoint-path {tmp_path}/cp "
        f"--logdir {tmp_path}/logs/"
    ).split()
    return argv if scheduler == "slurm" else argv + ["--scheduler", "sge"]


def cancel_when_submitted(folder, trial, cancel):
    """A thread that cancels `trial`'s job with the scheduler's own command as soon as it is submitted."""

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if os.path.exists(os.path.join(folder, hp_space.LOG_NAME)):
                jobs = [e["job_id"] for e in events(folder) if e["event"] == "job" and e["trial"] == trial]
                if jobs:
                    subprocess.run([cancel, jobs[0]], check=True, capture_output=True)
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def cluster_search(speakers, tmp_path, monkeypatch, scheduler):
    """Run the search through the scheduler, trial 1 made to fail and trial 2 cancelled; returns its trials."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("E2E_PYTHON", sys.executable)
    cp = tmp_path / "cp"
    cp.mkdir()
    (cp / "trial_0001.pt").mkdir()  # trial 1's job cannot save its checkpoint: it fails
    watcher = cancel_when_submitted(str(cp), 2, {"slurm": "scancel", "sge": "qdel"}[scheduler])
    assert hp_search_slurm.main(seed_speech_argv(speakers, tmp_path, scheduler)) == 0
    watcher.join()
    done = ends(cp)
    assert [done[t]["status"] for t in range(4)] == ["ok", "failed", "failed", "ok"], done
    assert "exited with status" in done[1]["error"] and "IsADirectoryError" in done[1]["error"]
    assert all(done[t]["job_id"] and os.path.exists(done[t]["log"]) for t in (0, 1, 3))
    assert len({e["job_id"] for e in done.values()}) == 4
    assert not [f for f in os.listdir(tmp_path / "temp_vox") if f.endswith(".objective")]
    return done


@pytest.mark.cluster
def test_slurm_search_runs_its_trials_as_slurm_jobs(speakers, tmp_path, monkeypatch):
    from clusters import slurm_cluster

    cluster = slurm_cluster()
    done = cluster_search(speakers, tmp_path, monkeypatch, "slurm")
    for trial, end in done.items():
        record = cluster.job_record(int(end["job_id"]))
        assert record is not None, f"job {end['job_id']} not in {cluster.jobcomp}"
        assert record["JobName"] == f"hp_trial_{trial}" and record["NodeList"] in (cluster.node, "(null)")
        assert record["State"] == {1: "FAILED", 2: "CANCELLED"}.get(trial, "COMPLETED")


@pytest.mark.cluster
def test_sge_search_runs_its_trials_as_grid_engine_jobs(speakers, tmp_path, monkeypatch):
    from clusters import sge_cluster

    cluster = sge_cluster()
    done = cluster_search(speakers, tmp_path, monkeypatch, "sge")
    for trial, end in done.items():
        record = cluster.job_record(int(end["job_id"]))
        assert record is not None, f"job {end['job_id']} not in {cluster.accounting}"
        assert record["jobname"] == f"hp_trial_{trial}" and record["qname"] == cluster.queue
        assert (record["exit_status"] != "0") == (trial in (1, 2))  # trial 2 was killed by qdel


def test_a_point_asked_again_is_told_its_known_loss_not_trained_again(tmp_path):
    calls = []

    def run(trial, params):
        calls.append(params)
        return {"status": "ok", "objective": params["n_hidden"] / 10}

    spec = {"n_hidden": hp_space.IMAGE_SPACE["n_hidden"], "softmax": hp_space.IMAGE_SPACE["softmax"]}
    header = {"space": spec, "budget": 6}
    optimizer = hp_space.make_optimizer("NGOpt", spec, 6, 1, seed=0)
    hp_space.run_search(hp_space.TrialLog(str(tmp_path)), header, optimizer, 6, 1, run)
    assert len(calls) == 6 and len({hp_space._key(p) for p in calls}) == 6  # 6 of the 8 points, each once
    repeats = [e for e in events(tmp_path) if e["event"] == "repeat"]
    assert repeats and all(e["loss"] == e["params"]["n_hidden"] / 10 for e in repeats)
    again = hp_space.Search(None, hp_space.make_optimizer("NGOpt", spec, 6, 1, seed=0))
    assert again.replay(events(tmp_path)) == [] and len(again.losses) == 6
