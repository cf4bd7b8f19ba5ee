"""average_checkpoints.py: the mean of N checkpoints' weights, recomputed by hand; the result loads as a training
checkpoint; every refusal is one line with exit 2 and leaves no output (nor touches an input)."""

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_data import make_image_tree, write_checkpoint

import average_checkpoints
import eval as eval_script
from e2e_verification import scoring
from e2e_verification.checkpoints import load_checkpoint, load_model, save_checkpoint
from utils import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = "average_checkpoints.py"


def train_like(path, epoch, seed, **change):
    """A training checkpoint of epoch `epoch` whose weights, BatchNorm statistics and step counts all differ with
    `seed` (tiny_data.write_checkpoint, then BN buffers drawn at random); `change` edits the dict before saving."""
    write_checkpoint(path, seed=seed, **change.pop("model_args", {}))
    state = load_checkpoint(path)
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state["model_state"].items():
        if name.endswith("running_mean") or name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
        elif name.endswith("num_batches_tracked"):
            tensor.fill_(100 * epoch)
    state.update(epoch=epoch, history={"e2e_eer": [0.5 / k for k in range(1, epoch + 1)]}, **change)
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training folder with checkpoint_{1,2,3}ep.pt."""
    folder = tmp_path_factory.mktemp("average")
    cps = [train_like(str(folder / f"checkpoint_{k}ep.pt"), k, seed=k) for k in (1, 2, 3)]
    return str(folder), cps


def weights(path):
    return load_checkpoint(path)["model_state"]


def check_mean(out, inputs):
    """Every tensor of `out` is the mean of `inputs`' (float64, cast back); integer ones are the last input's."""
    got, states = weights(out), [weights(p) for p in inputs]
    assert set(got) == set(states[0])
    n_int = 0
    for name, tensor in got.items():
        stacked = torch.stack([s[name] for s in states])
        assert tensor.dtype == stacked.dtype and tensor.shape == stacked.shape[1:]
        if tensor.is_floating_point():
            assert torch.equal(tensor, stacked.double().mean(0).to(tensor.dtype)), name
            torch.testing.assert_close(tensor, stacked.mean(0))
        else:
            assert torch.equal(tensor, states[-1][name]), name
            n_int += 1
    assert n_int > 0  # the densenet has BatchNorm layers: their num_batches_tracked took the last value


def test_last_n_is_the_hand_computed_mean_and_records_its_inputs(run, tmp_path, capsys):
    folder, cps = run
    out = str(tmp_path / "avg.pt")
    assert average_checkpoints.main(["--checkpoint-path", folder, "--last", "3", "--out", out]) == 0
    check_mean(out, cps)
    state, last = load_checkpoint(out), load_checkpoint(cps[-1])
    assert not {"optimizer_state", "scheduler_state", "scheduler_kind", "best", "total_iters"} & set(state)
    assert state["model_config"] == last["model_config"] and state["epoch"] == 3
    assert state["history"] == last["history"] and state["args"] == last["args"]
    record = state["averaged"]
    assert [r["epoch"] for r in record["checkpoints"]] == [1, 2, 3]
    assert [r["checkpoint"] for r in record["checkpoints"]] == [os.path.abspath(p) for p in cps]
    hashes = [load_model(p).provenance["weights_sha256"] for p in cps]
    assert [r["weights_sha256"] for r in record["checkpoints"]] == hashes and len(set(hashes)) == 3
    assert record["weights_sha256"] == load_model(out).provenance["weights_sha256"]
    assert record["integer_tensors"] == "last"
    printed = capsys.readouterr().out
    assert "averaged 3 checkpoints (epochs 1, 2, 3)" in printed and record["weights_sha256"] in printed

    out2 = str(tmp_path / "avg2.pt")
    assert average_checkpoints.main(["--checkpoint-path", folder, "--last", "2", "--out", out2]) == 0
    check_mean(out2, cps[1:])
    assert [r["epoch"] for r in load_checkpoint(out2)["averaged"]["checkpoints"]] == [2, 3]


def test_explicit_files_in_their_order_and_a_single_checkpoint(run, tmp_path):
    _, cps = run
    order = [cps[2], cps[0], cps[1]]
    out = str(tmp_path / "avg.pt")
    assert average_checkpoints.main(["--out", out, *order]) == 0
    check_mean(out, order)  # integer tensors from the last file given: epoch 2's
    assert load_checkpoint(out)["averaged"]["checkpoints"][-1]["epoch"] == 2

    one = str(tmp_path / "one.pt")
    assert average_checkpoints.main([cps[0], "--out", one]) == 0
    got, source = weights(one), weights(cps[0])
    assert set(got) == set(source) and all(torch.equal(got[k], source[k]) for k in got)
    assert "optimizer_state" not in load_checkpoint(one)


def test_a_half_precision_model_is_averaged_in_float64_and_stays_half(tmp_path):
    cps = []
    for k in (1, 2):
        path = str(tmp_path / f"h{k}.pt")
        train_like(path, k, seed=k)
        state = load_checkpoint(path)
        state["model_state"] = {n: t.half() if t.is_floating_point() else t for n, t in state["model_state"].items()}
        save_checkpoint(path, state)
        cps.append(path)
    out = str(tmp_path / "avg.pt")
    assert average_checkpoints.main(["--out", out, *cps]) == 0
    check_mean(out, cps)
    assert {t.dtype for t in weights(out).values() if t.is_floating_point()} == {torch.half}


def test_eval_scores_with_the_average_as_with_a_training_checkpoint(run, tmp_path):
    folder, _ = run
    out = str(tmp_path / "avg.pt")
    assert average_checkpoints.main(["--checkpoint-path", folder, "--last", "3", "--out", out]) == 0
    data = make_image_tree(str(tmp_path / "test"), n_classes=3, per_class=4)
    scores = str(tmp_path / "scores.out")
    assert eval_script.main(["--data-path", data, "--cp-path", out, "--out-path", scores, "--device", "cpu"]) == 0
    first = open(scores).readline()
    provenance = json.loads(first[len(scoring.PROVENANCE_LINE) :])
    assert provenance["weights_sha256"] == load_checkpoint(out)["averaged"]["weights_sha256"]
    assert provenance["checkpoint"] == os.path.abspath(out)
    assert "e2e" in json.load(open(scores + ".json"))["metrics"]


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def bad(run, tmp_path_factory):
    """Inputs each refusal needs, beside the good run."""
    root = tmp_path_factory.mktemp("average_bad")
    folder, cps = run
    paths = {"folder": folder, "cps": cps, "root": str(root)}
    paths["empty"] = str(root / "empty")
    os.makedirs(paths["empty"])
    paths["classes"] = train_like(str(root / "classes.pt"), 4, seed=4, model_args={"n_classes": 3})
    paths["config"] = train_like(str(root / "config.pt"), 4, seed=1)
    state = load_checkpoint(paths["config"])
    state["model_config"]["margin"] = 0.2  # same weights, another config
    save_checkpoint(paths["config"], state)
    paths["dtype"] = str(root / "dtype.pt")
    state = load_checkpoint(cps[0])
    name = next(n for n, t in state["model_state"].items() if t.is_floating_point())
    state["model_state"][name] = state["model_state"][name].double()
    save_checkpoint(paths["dtype"], state)
    paths["nan"] = str(root / "nan.pt")
    state = load_checkpoint(cps[1])
    state["model_state"][name].view(-1)[0] = float("nan")
    save_checkpoint(paths["nan"], state)
    paths["text"] = str(root / "notes.pt")
    with open(paths["text"], "w") as handle:
        handle.write("not a checkpoint\n")
    paths["input"] = train_like(str(root / "input.pt"), 5, seed=5)
    paths["link"] = str(root / "link.pt")
    os.link(paths["input"], paths["link"])
    return paths


REFUSALS = {  # case: (argv builder, the words its one error line holds)
    "nothing": (lambda p, out: ["--out", out], ["no checkpoints to average"]),
    "last 0": (lambda p, out: ["--checkpoint-path", p["folder"], "--last", "0", "--out", out], ["at least 1"]),
    "last 4 of 3": (lambda p, out: ["--checkpoint-path", p["folder"], "--last", "4", "--out", out], ["only 3"]),
    "both forms": (lambda p, out: ["--checkpoint-path", p["folder"], "--last", "2", "--out", out, p["cps"][0]],
                   ["not both"]),
    "last alone": (lambda p, out: ["--last", "2", "--out", out], ["go together"]),
    "empty folder": (lambda p, out: ["--checkpoint-path", p["empty"], "--last", "1", "--out", out],
                     ["no checkpoint_<k>ep.pt"]),
    "missing": (lambda p, out: ["--out", out, p["cps"][0], p["root"] + "/gone.pt"], ["not found", "gone.pt"]),
    "not a checkpoint": (lambda p, out: ["--out", out, p["cps"][0], p["text"]], ["not a PyTorch checkpoint"]),
    "classes": (lambda p, out: ["--out", out, p["cps"][0], p["classes"]],
                ["different models", "model_config.n_classes: 4 vs 3"]),
    "config": (lambda p, out: ["--out", out, p["cps"][0], p["config"]],
               ["different models", "model_config.margin: 0.35 vs 0.2"]),
    "dtype": (lambda p, out: ["--out", out, *p["cps"][:2], p["dtype"]],
              ["different models", "dtype of", "float32 vs float64"]),
    "nan": (lambda p, out: ["--out", out, p["cps"][0], p["nan"], p["cps"][2]], ["nan.pt", "non-finite"]),
    "twice": (lambda p, out: ["--out", out, *p["cps"][:2], os.path.join(p["folder"], ".", "checkpoint_1ep.pt")],
              ["given twice"]),
    "out is an input": (lambda p, out: ["--out", p["input"], p["cps"][0], p["input"]],
                        ["--out would overwrite", "input.pt"]),
    "out is a hard link": (lambda p, out: ["--out", p["link"], p["input"]], ["--out would overwrite", "input.pt"]),
    "epoch name": (lambda p, out: ["--out", p["root"] + "/checkpoint_9ep.pt", p["cps"][0]],
                   ["named as a training epoch"]),
}  # fmt: skip
THROUGH_A_PROCESS = ("last 4 of 3", "not a checkpoint", "classes", "out is a hard link")  # one of each layer


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


class Untouched:
    """Checks that a refused run left no output, no temporary file and every input byte for byte as it was."""

    def __init__(self, p):
        self.p, self.out = p, os.path.join(p["root"], "avg.pt")
        self.watched = [*p["cps"], p["input"]]
        self.before = self.state()

    def state(self):
        listing = [sorted(os.listdir(self.p[k])) for k in ("root", "folder", "empty")]
        return listing, {path: digest(path) for path in self.watched}

    def check(self, case):
        assert not os.path.exists(self.out), case
        assert self.state() == self.before, case


def check_one_line(case, code, out, err, prog):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{case}: exit {code}: {err[-1500:]}"
    assert len(lines) == 1 and "Traceback" not in err, f"{case}: {err[-1500:]}"
    assert lines[0].startswith(f"{prog}: error: "), f"{case}: {lines[0]}"
    assert all(w in lines[0] for w in REFUSALS[case][1]), f"{case}: {lines[0]}"
    assert not out, f"{case}: {out}"


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_is_one_line_exit_2_and_writes_nothing(bad, case, capsys):
    guard = Untouched(bad)
    with pytest.raises(SystemExit) as stop:
        cli(average_checkpoints.main, REFUSALS[case][0](bad, guard.out))
    out, err = capsys.readouterr()
    check_one_line(case, stop.value.code, out, err, os.path.basename(sys.argv[0]))
    guard.check(case)


def run_script(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, SCRIPT), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def test_refusals_through_the_command_line(bad):
    """A few of the refusals above, as a person meets them: a fresh process, its exit status and stderr."""
    guard = Untouched(bad)
    argvs = [REFUSALS[case][0](bad, guard.out) for case in THROUGH_A_PROCESS]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each is a fresh Python importing torch
        done = list(pool.map(run_script, argvs))
    for case, result in zip(THROUGH_A_PROCESS, done):
        check_one_line(case, result.returncode, result.stdout, result.stderr, SCRIPT)
    guard.check("through a process")
