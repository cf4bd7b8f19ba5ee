#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and CI of the cluster hyperparameter search.
#
#   scripts/slurm_cluster.sh start    install slurm-wlm + munge (Debian/Ubuntu), write the config, start
#                                     munged, slurmctld and slurmd; wait until the node is idle
#   scripts/slurm_cluster.sh stop     stop the daemons this script started (and only those)
#   scripts/slurm_cluster.sh status   print the node state; exit 0 when it takes jobs (idle/mixed/allocated)
#
# Where things live:
#   /etc/slurm/slurm.conf, /etc/slurm/gres.conf   the default paths, so plain sbatch/sinfo/sacct need no
#                                                 SLURM_CONF; written only when absent or written by us
#   $E2E_SLURM_DIR (default /tmp/e2e-slurm)       state, spool, logs, pid files, fake GPU device nodes,
#                                                 the job completion log (jobcomp.log) and started.list
# Choices (the first two make room for the seed's submit header,
#   #SBATCH --nodes=1 --gres=gpu:1 --ntasks-per-node=6 --mem=12000M --time=6-00:00:00 --wait):
#   - CPUs=6*GPUS and RealMemory=32000 with SlurmdParameters=config_overrides: the node claims more than
#     the machine has, so 6 tasks and 12000M fit; CR_CPU leaves memory unaccounted, so jobs share it.
#   - GresTypes=gpu with $E2E_SLURM_GPUS (default 2) fake GPUs: gres/gpu needs character devices, so
#     we make copies of /dev/null; Flags=no_gpu_env keeps CUDA_VISIBLE_DEVICES untouched in jobs.
#   - No slurmdbd: JobCompType=jobcomp/filetxt records every finished job; `sacct -c` reads that file.
#   - MinJobAge=4 keeps `sbatch --wait` polling every 2 s (it slows down when MinJobAge/2 > 2) while
#     a finished job stays visible long enough for the poll to read its exit code.
#   - proctrack/linuxproc and task/none: no cgroups needed (containers, VMs).
#   - AuthInfo=cred_expire=5 and sched_interval=1: a requeued job (scontrol requeue, as run_train_slurm.sh does
#     on Slurm's time-limit warning) may start again after 5 s, not 120, and the scheduler looks at pending
#     jobs every second, not every minute, so the requeue test finishes in seconds.
# Exit status: 0 ok, 1 failure, 3 the scheduler cannot be installed here (not root and no
# password-less sudo, no apt-get, or apt-get fails); tests skip on 3.
set -euo pipefail
LOG_NAME=slurm_cluster

# shellcheck source=scripts/cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"
become_root "$@"

DIR=${E2E_SLURM_DIR:-/tmp/e2e-slurm}
GPUS=${E2E_SLURM_GPUS:-2}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARKER="# written by e2e-verification scripts/slurm_cluster.sh"
NODE=$(hostname -s)
PARTITION=e2e

ensure_packages() {
	if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
		command -v sbatch >/dev/null && command -v munged >/dev/null; then
		return
	fi
	apt_install slurm-wlm munge
}

start_munge() {
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
		return
	fi
	if [[ ! -s /etc/munge/munge.key ]]; then
		mungekey --create --keyfile /etc/munge/munge.key
	fi
	mkdir -p /run/munge /var/lib/munge /var/log/munge
	chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
	chmod 0700 /etc/munge
	runuser -u munge -- munged
	local pid
	pid=$(alive_pid /run/munge/munged.pid munged) || {
		log "munged did not start"
		exit 1
	}
	mark_started munged /run/munge/munged.pid
	log "munged started (pid $pid)"
}

# The slurm.conf this script writes.
render_config() {
	cat <<EOF
$MARKER
ClusterName=e2e
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
MinJobAge=4
SlurmdParameters=config_overrides
NodeName=$NODE CPUs=$((6 * GPUS)) RealMemory=32000 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

write_config() {
	if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
		log "$CONF exists and was not written by this script; not touching it"
		exit 1
	fi
	mkdir -p "$DIR/state" "$DIR/spool" "$DIR/dev"
	local i
	for ((i = 0; i < GPUS; i++)); do
		[[ -c $DIR/dev/gpu$i ]] || mknod "$DIR/dev/gpu$i" c 1 3
	done
	render_config >"$CONF"
	printf '%s\nNodeName=%s Name=gpu File=%s/dev/gpu[0-%d] Flags=no_gpu_env\n' \
		"$MARKER" "$NODE" "$DIR" "$((GPUS - 1))" >"$GRES_CONF"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

wait_idle() {
	local state resumed=0 i
	for ((i = 0; i < 60; i++)); do
		state=$(node_state) || true
		case $state in
		idle | mixed | allocated) return 0 ;;
		drain* | down* | inval* | fail*)
			# A drain reason survives restarts in the state files; the node is fine now.
			if ((!resumed)); then
				scontrol update NodeName="$NODE" State=RESUME || true
				resumed=1
			fi
			;;
		esac
		sleep 0.5
	done
	log "node $NODE not idle after 30 s (state '${state:-unknown}'); see $DIR/slurmctld.log"
	exit 1
}

start() {
	ensure_packages
	mkdir -p "$DIR"
	start_munge
	local ctld d
	ctld=$(alive_pid "$DIR/slurmctld.pid" slurmctld) || ctld=
	d=$(alive_pid "$DIR/slurmd.pid" slurmd) || d=
	if [[ -z $ctld && -z $d ]]; then
		write_config
	elif grep -qsF "$MARKER" "$CONF" && [[ $(render_config) != "$(cat "$CONF")" ]]; then
		# running daemons of an older version of this script: give them today's settings
		write_config
		[[ -z $ctld ]] || scontrol reconfigure
	fi
	if [[ -z $ctld ]]; then
		slurmctld
		mark_started slurmctld "$DIR/slurmctld.pid"
	fi
	if [[ -z $d ]]; then
		slurmd
		mark_started slurmd "$DIR/slurmd.pid"
	fi
	wait_idle
	log "up: node $NODE, partition $PARTITION"
	printf 'node=%s\npartition=%s\njobcomp=%s\nlogdir=%s\n' "$NODE" "$PARTITION" "$DIR/jobcomp.log" "$DIR"
}

stop() { stop_started 20; }

status() {
	local state
	if ! alive_pid "$DIR/slurmctld.pid" slurmctld >/dev/null; then
		echo "node $NODE: slurmctld not running"
		return 1
	fi
	state=$(node_state) || true
	echo "node $NODE: ${state:-unreachable}"
	[[ $state == idle || $state == mixed || $state == allocated ]]
}

dispatch "$@"
