#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=6
#SBATCH --mem=12000M
#SBATCH --time=2-00:00:00
#SBATCH --job-name=e2e_train
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append

# Multi-node data-parallel training: `sbatch run_train_slurm.sh <train.py flags>`, from the repository root.
# srun starts one torchrun agent per Slurm task (--ntasks-per-node=1: one per node); the agents meet at a
# c10d rendezvous on the allocation's first node and each starts E2E_NPROC_PER_NODE training processes
# (default $SLURM_GPUS_ON_NODE, else 1): nccl on GPUs, gloo on CPUs (train.py picks). The flags go to
# train.py as given, after `--checkpoint-epoch last`: a run resumes from the newest checkpoint in its
# --checkpoint-path. When the time limit nears, Slurm sends USR1 to this script (--signal=B:USR1@120), which
# requeues the job: its processes get SIGTERM (train.py removes its temporaries) and the job starts again,
# continuing from its last epoch checkpoint (training is exact on resume, so the result is the same).
# Environment: E2E_PYTHON the interpreter (default .venv/bin/python, else python); E2E_NPROC_PER_NODE;
# E2E_NNODES the agent count expected (checked against the allocation's tasks); E2E_RDZV_PORT the
# rendezvous port on the first node (default 20000 + job id % 10000).
# Without Slurm, on machine K (0..N-1) of N, HOST being machine 0: python -m torch.distributed.run --nnodes N
#   --node-rank K --nproc-per-node G --rdzv-endpoint HOST:PORT train.py <flags>

refuse() {
	echo "run_train_slurm.sh: error: $*" >&2
	exit 2
}

if [ -n "${SLURM_SUBMIT_DIR:-}" ]; then
	cd "${SLURM_SUBMIT_DIR}" || exit 1
fi
[[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_NTASKS:-} ]] ||
	refuse "not inside a Slurm batch job: submit it with sbatch (see the comment at the top for plain torchrun)"
[[ -f train.py ]] || refuse "no train.py in ${PWD}: submit from the repository root"
(($# > 0)) || refuse "no train.py flags given: sbatch run_train_slurm.sh --checkpoint-path DIR [flags...]"
case " $* " in
*" --checkpoint-path "* | *" --checkpoint-path="*) ;;
*) refuse "give --checkpoint-path (a folder every node sees): a requeued job resumes from its newest checkpoint" ;;
esac

PYTHON=${E2E_PYTHON:-}
if [[ -z $PYTHON ]]; then
	PYTHON=python
	[[ -x .venv/bin/python ]] && PYTHON=${PWD}/.venv/bin/python
fi
command -v "$PYTHON" >/dev/null || refuse "no Python interpreter ${PYTHON} (E2E_PYTHON) on $(hostname -s)"
NNODES=${E2E_NNODES:-${SLURM_NTASKS}}
NPROC=${E2E_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
PORT=${E2E_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || refuse "E2E_NNODES must be a positive whole number, got '${NNODES}'"
((NNODES == SLURM_NTASKS)) ||
	refuse "E2E_NNODES=${NNODES} but the allocation runs ${SLURM_NTASKS} tasks (one torchrun agent each) on" \
		"${SLURM_JOB_NUM_NODES:-?} nodes; submit with --nodes=${NNODES} --ntasks-per-node=1"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || refuse "E2E_NPROC_PER_NODE must be a positive whole number, got '${NPROC}'"
[[ $PORT =~ ^[0-9]+$ ]] && ((PORT >= 1024 && PORT <= 65535)) ||
	refuse "E2E_RDZV_PORT must be a port number from 1024 to 65535, got '${PORT}'"
HOST=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1)
[[ -n $HOST ]] || refuse "cannot read the first node of ${SLURM_JOB_NODELIST}"

# The batch script runs on the first node, where the rendezvous store will listen: is its port free?
"$PYTHON" - "$PORT" <<'EOF' || refuse "rendezvous port ${PORT} on ${HOST} is in use; set E2E_RDZV_PORT to a free one"
import socket, sys
with socket.socket() as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
    try:
        probe.bind(("", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF

echo "run_train_slurm.sh: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${NNODES} agents x ${NPROC}" \
	"processes, rendezvous ${HOST}:${PORT}, ${PYTHON}" >&2

requeue() {
	echo "run_train_slurm.sh: time limit near: requeueing job ${SLURM_JOB_ID}; it resumes from its newest checkpoint" >&2
	scontrol requeue "${SLURM_JOB_ID}"
}
trap requeue USR1
# A --signal without B: reaches the agents too: they pass USR1 on to train.py, which stops as on SIGTERM.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
STEP_CPUS=()
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && STEP_CPUS=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")

# The c10d rendezvous numbers the nodes (torchrun ignores --node-rank with it); srun --label prefixes each line
# with its Slurm task. The flags travel as arguments, never as code.
srun --ntasks="${SLURM_NTASKS}" --kill-on-bad-exit=1 --label "${STEP_CPUS[@]}" bash -c \
	'exec "$1" -m torch.distributed.run --nnodes="$2" --nproc-per-node="$3" \
		--rdzv-backend=c10d --rdzv-endpoint="$4" --rdzv-id="$5" --max-restarts=0 \
		train.py --checkpoint-epoch last "${@:6}"' \
	_ "$PYTHON" "$NNODES" "$NPROC" "${HOST}:${PORT}" "$SLURM_JOB_ID" "$@" &
step=$!
# A trapped signal ends `wait` early; wait again until srun itself has ended, and exit with its status.
wait "$step"
status=$?
while kill -0 "$step" 2>/dev/null; do
	wait "$step"
	status=$?
done
exit "$status"
