"""The submit scripts run_hp_slurm.sh and run_hp_sge.sh go through real schedulers: the seed's header
is accepted, the 27 values reach train_hp.py as the seed's flags, and the job's exit status comes back
through `sbatch --wait` / `qsub -sync y` and the scheduler's own record."""

import json
import os
import re
import subprocess
import sys

import pytest
from clusters import REPO, sge_cluster, slurm_cluster

pytestmark = pytest.mark.cluster

SEED_FLAGS = (
    "--lr --l2 --momentum --smoothing --warmup --latent-size --n-hidden --hidden-size --n-frames "
    "--model --ndiscriminators --rproj-size --ncoef --dropout-prob --epochs --batch-size "
    "--valid-batch-size --workers --cuda --train-hdf-file --valid-hdf-file --out-file "
    "--checkpoint-path --cp-name --softmax --max-gnorm --logdir"
).split()

STUB_TRAIN_HP = """\
import json, os, sys
out = sys.argv[sys.argv.index("--out-file") + 1]
with open(out, "w") as f:
    json.dump(sys.argv[1:], f)
sys.exit(int(os.environ["E2E_STUB_EXIT"]))
"""


def _trial(folder, exit_code):
    """Put a stub train_hp.py in `folder` and return the 27 values, an environment for the job
    (stub exit code, this interpreter) and the out-file the stub writes."""
    (folder / "train_hp.py").write_text(STUB_TRAIN_HP)
    values = [f"v{i}" for i in range(1, 28)]
    values[21] = str(folder / "out.json")
    env = dict(os.environ, E2E_PYTHON=sys.executable, E2E_STUB_EXIT=str(exit_code))
    return values, env, folder / "out.json"


def _check_arguments(out_file, values):
    """The stub saw exactly `--flag value` for the seed's 27 flags, in order."""
    expected = [item for pair in zip(SEED_FLAGS, values) for item in pair]
    assert json.loads(out_file.read_text()) == expected


@pytest.mark.parametrize("exit_code", [0, 3])
def test_slurm_runs_submit_script(tmp_path, exit_code):
    cluster = slurm_cluster()
    values, env, out_file = _trial(tmp_path, exit_code)
    cmd = ["sbatch", str(REPO / "run_hp_slurm.sh"), *values]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    match = re.fullmatch(r"Submitted batch job (\d+)\n", proc.stdout)
    assert match, proc.stdout + proc.stderr
    job_id = int(match.group(1))
    assert proc.returncode == exit_code
    _check_arguments(out_file, values)
    assert (tmp_path / f"slurm-{job_id}.out").exists()
    record = cluster.job_record(job_id)
    assert record is not None, f"job {job_id} not in {cluster.jobcomp}"
    assert record["JobName"] == "hp_search"
    assert record["NodeList"] == cluster.node
    assert record["State"] == ("COMPLETED" if exit_code == 0 else "FAILED")
    assert record["ExitCode"] == f"{exit_code}:0"


@pytest.mark.parametrize("exit_code", [0, 3])
def test_sge_runs_submit_script(tmp_path, exit_code):
    cluster = sge_cluster()
    values, env, out_file = _trial(tmp_path, exit_code)
    cmd = ["qsub", "-sync", "y", "-N", "e2e_trial", str(REPO / "run_hp_sge.sh"), *values]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    match = re.match(r'Your job (\d+) \("e2e_trial"\) has been submitted\n', proc.stdout)
    assert match, proc.stdout + proc.stderr
    job_id = int(match.group(1))
    assert proc.returncode == exit_code
    _check_arguments(out_file, values)
    assert (tmp_path / f"e2e_trial.o{job_id}").exists()
    record = cluster.job_record(job_id)
    assert record is not None, f"job {job_id} not in {cluster.accounting}"
    assert record["jobname"] == "e2e_trial"
    assert record["qname"] == cluster.queue
    assert record["exit_status"] == str(exit_code)
    assert record["failed"] == "0"
