"""e2e_verification/threads.py: the thread count from the CPU affinity and the cgroup quota (real cgroup-format
files written here), the overrides, and commands that really start with the passive OpenMP wait and that count."""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from e2e_verification import threads
from utils import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the thread settings a child must not inherit from this test process (utils set OMP_WAIT_POLICY here)
CLEARED = ("E2E_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", *threads.BLAS_THREADS)
CLEARED += (threads.BLAS_SET_HERE,)


def cgroup(tmp_path, version, path, quotas, mount_root="/"):
    """Write a cgroup tree under tmp_path: `quotas` {relative folder: cpu.max text (v2) or (quota, period) (v1)},
    a mountinfo naming its mount point and a /proc/self/cgroup placing the process at `path`; -> the two files."""
    point = tmp_path / ("unified" if version == 2 else "cpu,cpuacct")
    for folder, quota in quotas.items():
        where = point / folder
        where.mkdir(parents=True, exist_ok=True)
        if version == 2:
            (where / "cpu.max").write_text(quota + "\n")
        else:
            (where / "cpu.cfs_quota_us").write_text(f"{quota[0]}\n")
            (where / "cpu.cfs_period_us").write_text(f"{quota[1]}\n")
    fs = "cgroup2 cgroup2 rw,nsdelegate" if version == 2 else "cgroup cgroup rw,cpu,cpuacct"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
        f"31 22 0:27 {mount_root} {point} rw,nosuid,nodev,noexec,relatime shared:9 - {fs}\n"
    )
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::{path}\n" if version == 2 else f"5:memory:{path}\n4:cpu,cpuacct:{path}\n1:name=systemd:/\n")
    return {"proc_cgroup": str(proc), "mountinfo": str(mountinfo)}


def test_cgroup_v2_quota_of_the_job_and_its_parents(tmp_path):
    files = cgroup(tmp_path, 2, "/slurm/job_7/step_0", {".": "max 100000", "slurm/job_7": "150000 100000"})
    (tmp_path / "unified" / "slurm" / "job_7" / "step_0").mkdir()
    assert threads.cgroup_cpus(**files) == 1.5  # the job's quota binds its step (no cpu.max of its own)
    assert threads.available_cpus({0, 1, 2, 3}, **files) == 1  # 1.5 CPUs: one whole CPU
    (tmp_path / "unified" / "slurm" / "job_7" / "step_0" / "cpu.max").write_text("50000 100000\n")
    assert threads.cgroup_cpus(**files) == 0.5
    assert threads.available_cpus({0, 1}, **files) == 1  # never fewer than one


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    files = cgroup(tmp_path, 1, "/slurm/uid_0/job_3", {".": (-1, 100000), "slurm/uid_0/job_3": (300000, 100000)})
    assert threads.cgroup_cpus(**files) == 3.0
    assert threads.available_cpus(set(range(8)), **files) == 3
    assert threads.available_cpus({0, 5}, **files) == 2  # the affinity set is the smaller
    (tmp_path / "cpu,cpuacct" / "slurm" / "uid_0" / "job_3" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpus(**files) is None
    assert threads.available_cpus(set(range(8)), **files) == 8


def test_cgroup_seen_from_inside_a_container(tmp_path):
    """A container mounts its own cgroup (mountinfo root = its path) at the mount point itself."""
    files = cgroup(tmp_path, 2, "/docker/abc", {".": "200000 100000"}, mount_root="/docker/abc")
    assert threads.cgroup_cpus(**files) == 2.0
    assert threads.available_cpus(set(range(16)), **files) == 2


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert threads.cgroup_cpus(str(tmp_path / "missing"), str(tmp_path / "missing")) is None
    files = cgroup(tmp_path, 2, "/user.slice", {})  # no cpu.max anywhere (the root cgroup has none)
    assert threads.cgroup_cpus(**files) is None
    assert threads.available_cpus({0, 1, 2}, **files) == 3


def test_overrides_come_first(tmp_path):
    files = cgroup(tmp_path, 2, "/job", {"job": "400000 100000"})
    assert threads.choose({}, {0, 1, 2, 3, 4, 5}, **files) == (4, "CPU affinity and cgroup quota")
    assert threads.choose({"OMP_NUM_THREADS": "3,1"}, {0}, **files) == (3, "OMP_NUM_THREADS")
    assert threads.choose({"E2E_THREADS": "6", "OMP_NUM_THREADS": "3"}, {0}, **files) == (6, "E2E_THREADS")
    assert threads.choose({"E2E_THREADS": " Torch "}, {0}, **files) == (None, "E2E_THREADS=torch")
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ValueError, match=f"E2E_THREADS='{bad}': expected a positive whole number"):
            threads.choose({"E2E_THREADS": bad}, {0}, **files)


def test_wait_policy_and_blas_counts_go_in_unless_the_user_chose():
    env = {}
    threads.prepare_environment(env)
    count = str(threads.available_cpus())
    ours = {threads.BLAS_SET_HERE: "OPENBLAS_NUM_THREADS,MKL_NUM_THREADS"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": count, "MKL_NUM_THREADS": count, **ours}
    env = {"OMP_WAIT_POLICY": "active", "E2E_THREADS": "3", "OPENBLAS_NUM_THREADS": "5"}
    threads.prepare_environment(env)
    assert env["OPENBLAS_NUM_THREADS"] == "5" and env["MKL_NUM_THREADS"] == "3"  # the user's count kept
    assert env["OMP_WAIT_POLICY"] == "active" and env[threads.BLAS_SET_HERE] == "MKL_NUM_THREADS"
    child = {**env, "E2E_THREADS": "2"}  # a child inherits them: its own count replaces only the module's
    threads.prepare_environment(child)
    assert child["OPENBLAS_NUM_THREADS"] == "5" and child["MKL_NUM_THREADS"] == "2"
    env = {"E2E_THREADS": "torch"}
    threads.prepare_environment(env)
    assert env == {"E2E_THREADS": "torch"}
    env = {"E2E_THREADS": "many"}  # reported by configure() as one line; nothing set from it here
    threads.prepare_environment(env)
    assert env == {"E2E_THREADS": "many", "OMP_WAIT_POLICY": "PASSIVE"}


BLAS_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import e2e_verification.threads
import numpy, threadpoolctl
print(*sorted({pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}))
"""


@pytest.mark.skipif(threads.available_cpus() < 2, reason="one CPU: numpy's BLAS has one thread either way")
def test_numpy_blas_starts_with_the_count_torch_gets():
    """A command's first import (e2e_verification.threads) caps the BLAS numpy loads after it: E2E_THREADS=1
    gives OpenBLAS one thread on a machine where it would take every CPU; E2E_THREADS=torch leaves it alone."""
    child = {k: v for k, v in os.environ.items() if k not in CLEARED}

    def blas_threads(env):
        argv = [sys.executable, "-c", BLAS_PROBE, ROOT]
        done = subprocess.run(argv, env={**child, **env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert blas_threads({"E2E_THREADS": "1"}) == ["1"]
    assert blas_threads({"E2E_THREADS": "torch"}) == [str(len(os.sched_getaffinity(0)))]


def test_cli_sets_the_count_while_main_runs_and_restores_it(monkeypatch, capsys):
    seen = []
    torch.set_num_threads(1)
    monkeypatch.setenv("E2E_THREADS", "3")
    with pytest.raises(SystemExit) as done:
        cli(lambda argv: seen.append(torch.get_num_threads()))
    assert (done.value.code, seen, torch.get_num_threads()) == (0, [3], 1)
    monkeypatch.setenv("E2E_THREADS", "many")
    with pytest.raises(SystemExit) as done:
        cli(lambda argv: seen.append("ran"))
    assert done.value.code == 2 and seen == [3]
    message = "error: E2E_THREADS='many': expected a positive whole number of threads"
    assert capsys.readouterr().err.strip().endswith(message)


def commands():
    """The commands at the repository root (scripts that end in `cli(main)`)."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path) as handle:
            if "\n    cli(main)" in handle.read():
                found.append(os.path.basename(path))
    return found


def test_every_command_imports_threads_before_anything_else():
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: a command whose first import loads torch (directly
    or through a module) would spin as before, so each command's first import is e2e_verification.threads."""
    late = []
    for command in commands():
        with open(os.path.join(ROOT, command)) as handle:
            body = ast.parse(handle.read()).body
        first = next(node for node in body if isinstance(node, (ast.Import, ast.ImportFrom)))
        if not (isinstance(first, ast.Import) and first.names[0].name == "e2e_verification.threads"):
            late.append(command)
    assert len(commands()) >= 10 and not late, f"first import is not `import e2e_verification.threads`: {late}"


# Runs a command's module as the command does up to its main (its imports, in its order), then utils.cli with a
# main that prints torch's thread count; libgomp prints the settings it read when torch loaded it.
PROBE = """
import os, runpy, sys
root, command = sys.argv[1:]
sys.path.insert(0, root)
runpy.run_path(os.path.join(root, command), run_name="probe")
import torch, utils
utils.cli(lambda argv: print("threads", torch.get_num_threads(), flush=True))
"""


def start_probe(command, env=None, cpus=None):
    """Start PROBE for `command` in a clean environment (+ `env`), on the CPUs `cpus` (default: these)."""
    child = {k: v for k, v in os.environ.items() if k not in CLEARED}
    child.update(env or {}, OMP_DISPLAY_ENV="VERBOSE")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    argv = [sys.executable, "-c", PROBE, ROOT, command]
    return subprocess.Popen(argv, env=child, preexec_fn=pin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def settings(probe):
    """(torch threads inside cli, libgomp's spin count) of a finished probe."""
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err
    spin = next(line for line in err.splitlines() if "GOMP_SPINCOUNT" in line)
    return int(out.split()[1]), spin.split("=")[1].strip().strip("'")


def test_the_demo_command_runs_with_the_passive_wait_and_the_cpus_it_was_given():
    """train.py (the digits demo) as started: a sleeping wait (spin count 0) and every CPU of its affinity set;
    pinned to one CPU, one thread; E2E_THREADS=torch gives libgomp's spinning default back (300000 spins)."""
    one_cpu = {min(os.sched_getaffinity(0))}
    probes = [start_probe("train.py"), start_probe("train.py", cpus=one_cpu)]
    probes.append(start_probe("train.py", {"E2E_THREADS": "torch"}))
    default, pinned, legacy = (settings(p) for p in probes)
    assert default == (threads.available_cpus(), "0")
    assert pinned == (1, "0")
    assert legacy[1] == "300000"


def test_train_help_starts_libgomp_with_the_passive_wait():
    child = {k: v for k, v in os.environ.items() if k not in CLEARED}
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--help"]
    done = subprocess.run(argv, env={**child, "OMP_DISPLAY_ENV": "VERBOSE"}, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: train.py" in done.stdout
    assert "  GOMP_SPINCOUNT = '0'" in done.stderr.splitlines()


@pytest.fixture
def shared_machine(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import shared_machine

    return shared_machine


def test_shared_machine_table_keeps_the_other_policy(shared_machine, tmp_path):
    def run(policy, ratio):
        return {
            "policy": policy, "command": f"python bench/shared_machine.py --policy {policy}", "demo_epochs": 20,
            "demo_threads": 2, "gomp_spincount": "0", "alone_s": 50.0, "beside_s": 50.0 * ratio, "ratio": ratio,
            "rival_threads": 2, "rival_steps_per_s": [10.0, None], "cpus": 2, "load_before": 0.1,
            "date": "2025-01-01 00:00",
        }  # fmt: skip

    page = tmp_path / "shared_machine.md"
    (tmp_path / "shared_machine.json").write_text(json.dumps({"runs": [run("new", 3.0), run("legacy", 8.7)]}))
    runs = shared_machine.merged(str(page), run("new", 2.1))
    assert [(r["policy"], r["ratio"]) for r in runs] == [("legacy", 8.7), ("new", 2.1)]
    text = shared_machine.render({"runs": runs})
    assert text.count("\n") == 4 and "**8.70×**" in text and "**2.10×**" in text and "10.0 → ?" in text


def test_rival_rate_between_two_times(shared_machine, tmp_path):
    log = tmp_path / "rival.log"
    log.write_text("100.0 10\n100.5 20\n101.0 30\n102.0 40\n")
    assert shared_machine.rival_rate(str(log), 100.5, 102.0) == pytest.approx(20 / 1.5)
    assert shared_machine.rival_rate(str(log), 103.0, 104.0) is None
    assert shared_machine.openmp_settings("x\n  OMP_NUM_THREADS = '2'\n  GOMP_SPINCOUNT = '0'\nEND\n") == {
        "OMP_NUM_THREADS": "2",
        "GOMP_SPINCOUNT": "0",
    }


@pytest.mark.slow
def test_shared_machine_quick(shared_machine, tmp_path, capsys):
    """The bench end to end (2 demo epochs, twice, one beside a rival): about a minute on an idle 2-core machine."""
    page = tmp_path / "shared.md"
    assert shared_machine.main(["--quick", "--out", str(page)]) == 0
    assert "a fair share is about 2x" in capsys.readouterr().out
    record = json.loads((tmp_path / "shared.json").read_text())
    (run,) = record["runs"]
    assert run["policy"] == "new" and run["gomp_spincount"] == "0" and run["beside_s"] > 0
    assert shared_machine.render(record) in page.read_text()
