"""A shared machine: the digits demo alone, then beside one other PyTorch training, and the ratio of the two times.

The demo is the README's `python train.py --device cpu` (20 epochs; --quick: 2), in a subprocess. The rival is
a plain PyTorch training loop (a small CNN on random images, --rival-threads threads, libgomp's default wait),
started as a subprocess before the second run and killed after it. Two runs sharing the cores fairly take
about twice their time alone; the goal is at most 2.5x. The rival's training steps per second, alone and
beside the demo, show whether the demo's share was taken from it.

--policy new runs the demo as the toolkit runs it now (e2e_verification/threads.py: the CPUs the job was
given, OpenMP threads that sleep while they wait); --policy legacy as it ran before (E2E_THREADS=torch:
torch's default thread count, libgomp's spin-then-sleep wait). The demo's libgomp reports the spin count it
really uses (OMP_DISPLAY_ENV), which the table shows. A run replaces its policy's row of --out, so the two
runs of the example make one before/after table. Run it on an otherwise quiet machine.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import benchlib
import torch
from benchlib import ROOT, UserError, at_least

from e2e_verification import threads
from utils import cli

EXAMPLE = """example (before, then after):
  python bench/shared_machine.py --policy legacy
  python bench/shared_machine.py --policy new"""

POLICIES = ("legacy", "new")
# what the demo's environment must not inherit from the bench's, so the policy alone decides
CLEARED = ("E2E_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")

# The rival: plain PyTorch, nothing of the toolkit; prints "<monotonic seconds> <steps>" twice a second.
RIVAL = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
nn = torch.nn
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                    nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
steps, shown = 0, 0.0
while True:
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    steps += 1
    if time.monotonic() - shown >= 0.5:
        shown = time.monotonic()
        print(shown, steps, flush=True)
"""

OPTIONS = {
    "--policy": dict(choices=POLICIES, default="new", help="threads and OpenMP wait of the demo (default new)"),
    "--quick": ("2 demo epochs instead of 20, a 3 s look at the rival alone instead of 10 s (a check, not a result)",),
    "--rival-threads": (at_least(1), 2, "torch threads of the rival training (default 2)"),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.out_table("shared_machine"))


def demo_env(policy):
    """The demo's environment: the bench's without thread settings; legacy adds E2E_THREADS=torch. libgomp
    prints its settings at start (OMP_DISPLAY_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    if policy == "legacy":
        env[threads.ENV] = threads.TORCH_DEFAULTS
    return {**env, "OMP_DISPLAY_ENV": "VERBOSE"}


def run_demo(argv, env):
    """Run the demo to its end; -> (wall seconds, libgomp's settings {name: value} from its first display)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["nothing on stderr"]
        raise UserError(f"the digits demo failed ({done.returncode}): {last[0]}")
    return seconds, openmp_settings(done.stderr)


def openmp_settings(stderr):
    """{name: value} of the first block libgomp printed with OMP_DISPLAY_ENV ("  GOMP_SPINCOUNT = '0'")."""
    settings = {}
    for line in stderr.splitlines():
        if "DISPLAY ENVIRONMENT END" in line:
            break
        name, sep, value = line.strip().partition(" = ")
        if sep:
            settings[name] = value.strip("'")
    return settings


def rival_rate(log, start, end):
    """Training steps per second of the rival between monotonic times `start` and `end`, from its log lines."""
    with open(log) as handle:
        marks = [tuple(map(float, line.split())) for line in handle if len(line.split()) == 2]
    before = [m for m in marks if m[0] <= start] or marks[:1]
    within = [m for m in marks if m[0] <= end]
    if not marks or within[-1][0] <= before[-1][0]:
        return None
    return (within[-1][1] - before[-1][1]) / (within[-1][0] - before[-1][0])


def start_rival(count, log):
    """Start the rival with `count` threads, writing to file `log`; return once it has trained a second."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    rival = subprocess.Popen([sys.executable, "-c", RIVAL, str(count)], stdout=log, stderr=subprocess.DEVNULL, env=env)
    while _line_count(log.name) < 3:
        if rival.poll() is not None:
            raise UserError(f"the rival training stopped ({rival.returncode}) before it began")
        time.sleep(0.2)
    return rival


def _line_count(path):
    """The number of lines in file `path`."""
    with open(path) as handle:
        return sum(1 for _ in handle)


def stop(process):
    """Kill `process` (the rival) and wait for it."""
    process.kill()
    process.wait()


def measure(args, work):
    """Time the demo alone and beside the rival; -> the run's record."""
    load_before = os.getloadavg()[0]  # the machine's 1-minute load average: near 0 on a quiet machine
    env = demo_env(args.policy)
    chosen, why = threads.choose(env)
    demo = ["--device", "cpu", *(["--epochs", "2"] if args.quick else []), "--checkpoint-path"]
    print(f"policy {args.policy}: demo threads {chosen or 'torch default'} ({why}); alone ...", flush=True)
    alone_s, settings = run_demo([*demo, os.path.join(work, "alone")], env)
    with open(os.path.join(work, "rival.log"), "w") as log:
        rival = start_rival(args.rival_threads, log)
        try:
            look = time.monotonic()
            time.sleep(3 if args.quick else 10)
            print(f"  {alone_s:.1f} s; beside a {args.rival_threads}-thread rival ...", flush=True)
            begin = time.monotonic()
            beside_s, _ = run_demo([*demo, os.path.join(work, "beside")], env)
            end = time.monotonic()
            if rival.poll() is not None:
                raise UserError(f"the rival training stopped ({rival.returncode}) during the demo")
        finally:
            stop(rival)
    rates = rival_rate(log.name, look, begin), rival_rate(log.name, begin, end)
    return {
        "policy": args.policy,
        "demo_epochs": 2 if args.quick else 20,
        "demo_threads": chosen or int(settings.get("OMP_NUM_THREADS", "0").split(",")[0] or 0),
        "gomp_spincount": settings.get("GOMP_SPINCOUNT"),
        "alone_s": round(alone_s, 2),
        "beside_s": round(beside_s, 2),
        "ratio": round(beside_s / alone_s, 3),
        "rival_threads": args.rival_threads,
        "rival_steps_per_s": [None if r is None else round(r, 2) for r in rates],
        "cpus": threads.available_cpus(),
        "load_before": round(load_before, 2),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def render(record):
    """Markdown: one row per policy (the latest run of each), with the command that made it."""
    lines = [
        "| policy (command) | threads | GOMP_SPINCOUNT | demo alone | beside the rival | ratio "
        "| rival steps/s alone → beside | CPUs, load before, date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        alone, beside = ("?" if x is None else f"{x:.1f}" for x in r["rival_steps_per_s"])
        rival = f"{r['rival_threads']}-thread rival: {alone} → {beside}"
        lines.append(
            f"| {r['policy']} (`{r['command']}`, {r['demo_epochs']} epochs) | {r['demo_threads']} "
            f"| {r['gomp_spincount']} | {r['alone_s']:.1f} s | {r['beside_s']:.1f} s | **{r['ratio']:.2f}×** "
            f"| {rival} | {r['cpus']}, {r['load_before']:.2f}, {r['date']} |"
        )
    return "\n".join(lines) + "\n"


def merged(out, run):
    """The runs recorded beside page `out` with `run` in place of its policy's earlier one, in POLICIES order."""
    try:
        with open(benchlib.json_beside(out)) as handle:
            earlier = json.load(handle).get("runs", [])
    except (OSError, ValueError, AttributeError):
        earlier = []
    keep = [r for r in earlier if isinstance(r, dict) and r.get("policy") in POLICIES and r["policy"] != run["policy"]]
    return sorted([*keep, run], key=lambda r: POLICIES.index(r["policy"]))


def main(argv=None):
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shared_machine_") as work:
        run = measure(args, work)
    words = sys.argv[1:] if argv is None else list(argv)
    run["command"] = shlex.join(["python", "bench/shared_machine.py", *words])
    print(benchlib.ratio_line("digits demo alone", run["alone_s"], "beside the rival", run["beside_s"]))
    verdict = "met" if run["ratio"] <= 2.5 else "NOT met"
    print(f"a fair share is about 2x; the goal, at most 2.5x, is {verdict}")
    runs = merged(args.out, run) if args.out else [run]
    benchlib.publish(__file__, argv, args, runs, render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
