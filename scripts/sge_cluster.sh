#!/usr/bin/env bash
# A one-node Grid Engine cluster (Son of Grid Engine 8.1.9 from Debian) for tests and CI of the search.
#
#   scripts/sge_cluster.sh start    install gridengine-{master,exec,client}, start sge_qmaster, configure
#                                   it, start sge_execd; wait until the queue takes jobs
#   scripts/sge_cluster.sh stop     stop the daemons this script started (and only those)
#   scripts/sge_cluster.sh status   print the queue instance; exit 0 when it takes jobs
#
# Where things live: the Debian package's cell, $SGE_ROOT/default (SGE_ROOT=/var/lib/gridengine;
# common/host_aliases and common/act_qmaster are written here) and spool /var/spool/gridengine
# (the daemons' pid files and messages logs). $E2E_SGE_DIR (default /tmp/e2e-sge) holds the
# configuration files this script feeds to qconf and started.list.
# Choices:
#   - debconf is preseeded (cell "default", master = this host) so the install is noninteractive.
#   - host_aliases makes `hostname -s`, its other names and localhost one host; otherwise the daemons
#     see themselves as "localhost" and the configured host as a stranger.
#   - global config: min_uid/min_gid 0 so root may submit (CI containers run as root);
#     accounting_flush_time 0 so `qacct -j` sees a job as soon as it ends.
#   - scheduler: 1 s interval and flush on submit/finish (the default 15 s makes each job 16-20 s),
#     no load adjustments.
#   - queue $QUEUE: slots $E2E_SGE_SLOTS (default 4), pe_list NONE, load_thresholds NONE (a busy
#     2-core machine would otherwise put the queue in alarm and stop scheduling), shell /bin/bash.
#   - Submit with an explicit `-N name`.
# Exit status: 0 ok, 1 failure, 3 the scheduler cannot be installed here (not root and no
# password-less sudo, no apt-get, or apt-get fails); tests skip on 3.
set -euo pipefail
LOG_NAME=sge_cluster

# shellcheck source=scripts/cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"
become_root "$@"

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
DIR=${E2E_SGE_DIR:-/tmp/e2e-sge}
SLOTS=${E2E_SGE_SLOTS:-4}
HOST=$(hostname -s)
QUEUE=e2e.q
COMMON=$SGE_ROOT/$SGE_CELL/common
QMASTER_PID=/var/spool/gridengine/qmaster/qmaster.pid

ensure_packages() {
	if command -v sge_qmaster >/dev/null && command -v sge_execd >/dev/null &&
		command -v qsub >/dev/null; then
		return
	fi
	local p
	for p in gridengine-common gridengine-client gridengine-master gridengine-exec; do
		printf '%s shared/gridengineconfig boolean true\n%s shared/gridenginecell string default\n%s shared/gridenginemaster string %s\n' \
			"$p" "$p" "$p" "$HOST"
	done | debconf-set-selections
	apt_install gridengine-master gridengine-exec gridengine-client
}

# The execd spools under the name it resolves for itself (here "localhost"), so look in every folder.
execd_pidfile() {
	local f
	for f in /var/spool/gridengine/execd/*/execd.pid; do
		if alive_pid "$f" sge_execd >/dev/null; then
			echo "$f"
			return 0
		fi
	done
	return 1
}

# Run a qconf command quietly (it reports success on stderr); show its output only when it fails.
quiet() {
	local out
	out=$("$@" 2>&1) || {
		log "$* failed: $out"
		exit 1
	}
}

write_host_aliases() {
	local addr
	addr=$(getent hosts "$HOST" | awk '{print $1; exit}')
	{
		echo "$HOST"
		hostname -f 2>/dev/null || true
		echo localhost
		awk -v a="$addr" '$1 == a {for (i = 2; i <= NF; i++) print $i}' /etc/hosts
	} | awk 'NF && !seen[$0]++' | paste -sd' ' >"$COMMON/host_aliases"
	echo "$HOST" >"$COMMON/act_qmaster"
}

start_qmaster() {
	if alive_pid "$QMASTER_PID" sge_qmaster >/dev/null; then
		return
	fi
	write_host_aliases
	sge_qmaster
	mark_started sge_qmaster "$QMASTER_PID"
	local i
	for ((i = 0; i < 60; i++)); do
		qconf -sh >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	log "sge_qmaster not answering after 30 s; see /var/spool/gridengine/qmaster/messages"
	exit 1
}

# Rewrite "key value" lines of a qconf listing (stdin) with the given key=value arguments; a value
# may hold spaces, and the old value's continuation lines (ending in a backslash) are dropped.
set_keys() {
	awk 'BEGIN {
			for (i = 1; i < ARGC; i++) {
				eq = index(ARGV[i], "=")
				v[substr(ARGV[i], 1, eq - 1)] = substr(ARGV[i], eq + 1)
			}
			ARGC = 1
		}
		skip { skip = ($NF == "\\"); next }
		($1 in v) { printf "%-28s %s\n", $1, v[$1]; skip = ($NF == "\\"); next }
		{ print }' "$@"
}

configure() {
	mkdir -p "$DIR"
	qconf -sconf global | set_keys min_uid=0 min_gid=0 \
		reporting_params='accounting=true reporting=false flush_time=00:00:15 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00' \
		>"$DIR/global"
	quiet qconf -Mconf "$DIR/global"
	qconf -ssconf | set_keys schedule_interval=0:0:1 flush_submit_sec=1 flush_finish_sec=1 \
		job_load_adjustments=NONE load_adjustment_decay_time=0:0:0 >"$DIR/sched"
	quiet qconf -Msconf "$DIR/sched"
	qconf -ss 2>/dev/null | grep -qx "$HOST" || quiet qconf -as "$HOST"
	printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' \
		"$HOST" >"$DIR/exechost"
	if qconf -sel 2>/dev/null | grep -qx "$HOST"; then
		quiet qconf -Me "$DIR/exechost"
	else
		quiet qconf -Ae "$DIR/exechost"
	fi
	write_queue >"$DIR/queue"
	if qconf -sql 2>/dev/null | grep -qx "$QUEUE"; then
		quiet qconf -Mq "$DIR/queue"
	else
		quiet qconf -Aq "$DIR/queue"
	fi
}

write_queue() {
	local k
	printf '%-20s %s\n' qname "$QUEUE" hostlist "$HOST" seq_no 0 load_thresholds NONE \
		suspend_thresholds NONE nsuspend 1 suspend_interval 00:05:00 priority 0 \
		min_cpu_interval 00:05:00 processors UNDEFINED qtype "BATCH INTERACTIVE" ckpt_list NONE \
		pe_list NONE rerun FALSE slots "$SLOTS" tmpdir /tmp shell /bin/bash prolog NONE epilog NONE \
		shell_start_mode unix_behavior starter_method NONE suspend_method NONE resume_method NONE \
		terminate_method NONE notify 00:00:60 owner_list NONE user_lists NONE xuser_lists NONE \
		subordinate_list NONE complex_values NONE projects NONE xprojects NONE calendar NONE \
		initial_state default
	for k in rt cpu fsize data stack core rss vmem; do
		printf '%-20s INFINITY\n' "s_$k" "h_$k"
	done
}

# The queue instance line of `qstat -f` has 5 fields when it has no state flags (u, a, E, d ...).
queue_ready() {
	qstat -f -q "$QUEUE" 2>/dev/null | awk -v q="$QUEUE@" 'index($1, q) == 1 {print; ok = (NF == 5 && $4 != "-NA-")} END {exit !ok}'
}

# Facts for tests, as key=value lines on stdout.
facts() {
	printf 'host=%s\nqueue=%s\nslots=%s\naccounting=%s\n' "$HOST" "$QUEUE" "$SLOTS" "$COMMON/accounting"
}

start() {
	ensure_packages
	mkdir -p "$DIR"
	if alive_pid "$QMASTER_PID" sge_qmaster >/dev/null && execd_pidfile >/dev/null &&
		queue_ready >/dev/null; then
		log "already up: queue $QUEUE@$HOST"
		facts
		return 0
	fi
	start_qmaster
	configure
	if ! execd_pidfile >/dev/null; then
		sge_execd
		local i f
		for ((i = 0; i < 20; i++)); do
			f=$(execd_pidfile) && break
			sleep 0.5
		done
		[[ -n ${f:-} ]] || {
			log "sge_execd did not start"
			exit 1
		}
		mark_started sge_execd "$f"
	fi
	local i
	for ((i = 0; i < 60; i++)); do
		if queue_ready >/dev/null; then
			log "up: queue $QUEUE@$HOST, $SLOTS slots"
			facts
			return 0
		fi
		# An error state left by an earlier job survives restarts; clear it.
		qmod -c "$QUEUE" >/dev/null 2>&1 || true
		sleep 0.5
	done
	log "queue $QUEUE not ready after 30 s: $(qstat -f -q "$QUEUE" 2>&1 | tail -n1)"
	exit 1
}

stop() { stop_started 30; }

status() {
	local line
	if line=$(queue_ready); then
		echo "$line"
		return 0
	fi
	echo "queue $QUEUE@$HOST: not ready"
	return 1
}

dispatch "$@"
