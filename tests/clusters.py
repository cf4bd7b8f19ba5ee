"""Real one-node Slurm and Grid Engine clusters for tests, started through scripts/*_cluster.sh.

`slurm_cluster()` and `sge_cluster()` start (or find running) a cluster and return its facts; they
skip the calling test only when the scheduler cannot be installed (the scripts exit 3).
"""

import dataclasses
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CANNOT_INSTALL = 3


def _start(script: str) -> dict[str, str]:
    """Run `scripts/<script> start` and return the key=value facts it prints."""
    cmd = [str(REPO / "scripts" / script), "start"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode == CANNOT_INSTALL:
        pytest.skip(f"{script}: scheduler packages cannot be installed: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(f"{script} start failed ({proc.returncode}): {proc.stderr.strip()}")
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def _poll(read, timeout: float = 10.0):
    """Call `read()` until it returns something other than None, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (found := read()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """A running one-node Slurm: node name, default partition, job completion log and log folder."""

    node: str
    partition: str
    jobcomp: Path
    logdir: Path

    def job_record(self, job_id: int) -> dict[str, str] | None:
        """Slurm's record of a finished job (JobID, JobName, State, ExitCode, NodeList), from the
        job completion log through `sacct -c`; None when Slurm has no record of it."""
        fields = ["JobID", "JobName", "State", "ExitCode", "NodeList"]
        cmd = ["sacct", "-c", "-n", "-P", "-j", str(job_id), "-o", ",".join(fields)]

        def read():
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines()]
            return next((row for row in rows if row["JobID"] == str(job_id)), None)

        return _poll(read)


@dataclasses.dataclass(frozen=True)
class SgeCluster:
    """A running one-node Grid Engine: host, queue, its slot count and the accounting file."""

    host: str
    queue: str
    slots: int
    accounting: Path

    def job_record(self, job_id: int) -> dict[str, str] | None:
        """Grid Engine's accounting record of a finished job (`qacct -j`: jobname, exit_status,
        failed, qname, hostname ...); None when there is none."""

        def read():
            proc = subprocess.run(["qacct", "-j", str(job_id)], capture_output=True, text=True)
            if proc.returncode != 0:
                return None
            pairs = (line.split(None, 1) for line in proc.stdout.splitlines())
            return {p[0]: p[1].strip() if len(p) > 1 else "" for p in pairs if p and p[0][0] != "="}

        return _poll(read)


def slurm_cluster() -> SlurmCluster:
    """Start the Slurm cluster (idempotent) and return its facts."""
    facts = _start("slurm_cluster.sh")
    return SlurmCluster(
        node=facts["node"],
        partition=facts["partition"],
        jobcomp=Path(facts["jobcomp"]),
        logdir=Path(facts["logdir"]),
    )


def sge_cluster() -> SgeCluster:
    """Start the Grid Engine cluster (idempotent) and return its facts."""
    facts = _start("sge_cluster.sh")
    return SgeCluster(
        host=facts["host"],
        queue=facts["queue"],
        slots=int(facts["slots"]),
        accounting=Path(facts["accounting"]),
    )
