"""How many CPU threads torch computes with, and how its OpenMP threads wait: a fair share of a shared machine.

torch's CPU kernels run on libgomp (GNU OpenMP), which by default lets a thread that waits for the others spin
on its core for a few milliseconds, and uses every core. Beside another process that does the same, spinning
threads take the cores the running ones need and both runs slow down many times over. So:

- importing this module (utils does, and every command imports it before torch) puts OMP_WAIT_POLICY=PASSIVE
  in the environment (a waiting thread sleeps); libgomp reads it once, when `import torch` loads it;
- `configure()` (run by utils.cli before a command's main) sets torch's thread count to the CPUs the job was
  given: its CPU affinity (taskset, a Slurm cpuset) and its cgroup CPU quota (v2 cpu.max, v1
  cpu.cfs_quota_us / cpu.cfs_period_us), whichever is smaller.

- importing it also caps numpy's BLAS threads (OPENBLAS_NUM_THREADS, MKL_NUM_THREADS) to the same count,
  read when numpy loads its BLAS.

E2E_THREADS=N sets the count instead; an OMP_NUM_THREADS, OMP_WAIT_POLICY or BLAS count the user set is kept;
E2E_THREADS=torch leaves the counts and the wait policy to torch, libgomp and the BLAS (the behaviour before).
Only the standard library is imported here, so nothing loads libgomp before the policy is in place.
"""

import math
import os

ENV = "E2E_THREADS"
TORCH_DEFAULTS = "torch"  # E2E_THREADS=torch: change nothing
WAIT_POLICY = "PASSIVE"
# numpy's and scipy's BLAS (OpenBLAS in the wheels; MKL in some builds) start their own thread pools, sized to
# every CPU and blind to a cgroup quota: capped like torch (PLDA, calibration and the metrics run on them)
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# which of them this module set: a child process (a Slurm job submitted from a smaller machine, a worker pinned
# to fewer CPUs) inherits them, and computes its own count instead of taking its parent's for the user's
BLAS_SET_HERE = "E2E_BLAS_THREADS_SET"
PROC_CGROUP = "/proc/self/cgroup"
MOUNTINFO = "/proc/self/mountinfo"


def leaves_torch_defaults(environ=os.environ):
    """True when E2E_THREADS=torch asks to leave threads and wait policy at torch's defaults."""
    return environ.get(ENV, "").strip().lower() == TORCH_DEFAULTS


def prepare_environment(environ=os.environ):
    """Put OMP_WAIT_POLICY=PASSIVE in `environ` unless the user set a policy (or E2E_THREADS=torch), and the
    thread count choose() gives into BLAS_THREADS unless the user set them; they take effect only if torch
    (libgomp) and numpy (its BLAS) are not loaded yet, and child processes inherit them."""
    if leaves_torch_defaults(environ):
        return
    environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    try:
        threads, _ = choose(environ)
    except ValueError:  # a bad E2E_THREADS or OMP_NUM_THREADS: configure() says so, as one line
        return
    ours = set(environ.get(BLAS_SET_HERE, "").split(","))  # set by this module in a parent: recomputed here
    for name in BLAS_THREADS:
        if name in ours or name not in environ:
            environ[name] = str(threads)
            ours.add(name)
    environ[BLAS_SET_HERE] = ",".join(name for name in BLAS_THREADS if name in ours)


def _cpu_hierarchies(proc_cgroup):
    """{'v1' or 'v2': the process's cgroup path} for the hierarchies that can hold the cpu controller, read
    from a /proc/<pid>/cgroup file ('ID:controllers:/path' lines)."""
    found = {}
    with open(proc_cgroup) as handle:
        for line in handle:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            if parts[0] == "0" and controllers == "":
                found["v2"] = path
            elif "cpu" in controllers.split(","):
                found["v1"] = path
    return found


def _cpu_mounts(mountinfo):
    """{'v1' or 'v2': (root inside the hierarchy, mount point)} of the cgroup file systems holding the cpu
    controller, read from a /proc/<pid>/mountinfo file."""
    found = {}
    with open(mountinfo) as handle:
        for line in handle:
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            if len(fields) < sep + 4 or sep < 5:
                continue
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            root, point = _unescape(fields[3]), _unescape(fields[4])
            if fstype == "cgroup" and "cpu" in options:
                found.setdefault("v1", (root, point))
            elif fstype == "cgroup2":
                found.setdefault("v2", (root, point))
    return found


def _unescape(field):
    """A mountinfo path field with its octal escapes (\\040 for a space) decoded."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _read(path):
    """The stripped text of file `path`, or None when it cannot be read."""
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _folder_quota(folder, version):
    """CPUs allowed by the quota file(s) of one cgroup folder (quota / period), or None when unlimited or absent."""
    if version == "v2":
        text = _read(os.path.join(folder, "cpu.max"))
        quota, _, period = (text or "max").partition(" ")
    else:
        quota, period = (_read(os.path.join(folder, name)) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):  # v2 "max" (no limit), or a file missing
        return None
    return quota / period if quota > 0 and period > 0 else None  # v1 -1: no limit


def cgroup_cpus(proc_cgroup=PROC_CGROUP, mountinfo=MOUNTINFO):
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), the smallest along its path up to the mount
    point (a parent's quota binds too); None when there is none or the files cannot be read."""
    try:
        paths, mounts = _cpu_hierarchies(proc_cgroup), _cpu_mounts(mountinfo)
    except OSError:
        return None
    version = "v1" if "v1" in paths and "v1" in mounts else "v2"  # v1 holds cpu when both are mounted
    if version not in paths or version not in mounts:
        return None
    root, point = mounts[version]
    relative = os.path.relpath(paths[version], root) if _inside(paths[version], root) else "."
    folder = os.path.normpath(os.path.join(point, relative))
    quotas = []
    while True:
        quotas.append(_folder_quota(folder, version))
        if folder == os.path.normpath(point) or len(folder) <= 1:
            break
        folder = os.path.dirname(folder)
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _inside(path, root):
    """True when cgroup path `path` is `root` or below it."""
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def available_cpus(affinity=None, proc_cgroup=PROC_CGROUP, mountinfo=MOUNTINFO):
    """The CPUs this job may use: its affinity set (default os.sched_getaffinity), fewer when the cgroup
    quota allows fewer whole CPUs (1.5 CPUs -> 1); at least 1."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    count = len(affinity)
    quota = cgroup_cpus(proc_cgroup, mountinfo)
    if quota is not None:
        count = min(count, math.floor(quota))
    return max(1, count)


def _positive(name, text):
    """The thread count `text` given in environment variable `name`: a positive integer, or a ValueError."""
    value = text.split(",")[0].strip()  # OMP_NUM_THREADS may list one count per nesting level
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={text!r}: expected a positive whole number of threads")
    return int(value)


def choose(environ=os.environ, affinity=None, proc_cgroup=PROC_CGROUP, mountinfo=MOUNTINFO):
    """-> (threads, why): E2E_THREADS, else OMP_NUM_THREADS, else available_cpus(); (None, why) for
    E2E_THREADS=torch. A bad value is a ValueError naming the variable."""
    if leaves_torch_defaults(environ):
        return None, f"{ENV}={TORCH_DEFAULTS}"
    for name in (ENV, "OMP_NUM_THREADS"):
        if environ.get(name, "").strip():
            return _positive(name, environ[name]), name
    return available_cpus(affinity, proc_cgroup, mountinfo), "CPU affinity and cgroup quota"


def configure(environ=os.environ):
    """Set torch's thread count as choose() says; -> that count (None: torch's own). A bad E2E_THREADS or
    OMP_NUM_THREADS is a UserError."""
    import torch

    from utils import UserError

    try:
        threads, _ = choose(environ)
    except ValueError as err:
        raise UserError(str(err)) from None
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


prepare_environment()
