# shellcheck shell=bash
# Shared by scripts/slurm_cluster.sh and scripts/sge_cluster.sh (sourced, not run): becoming root, package
# installs, pid checks, and stopping exactly the daemons a script recorded in $DIR/started.list.
# The sourcing script sets LOG_NAME and DIR first, and defines start and status.

log() { echo "$LOG_NAME: $*" >&2; }

# Re-run the calling script under password-less sudo when not root; exit 3 when that is impossible.
become_root() {
	[[ $(id -u) -eq 0 ]] && return
	if ! sudo -n true 2>/dev/null; then
		echo "$(basename "$0"): needs root or password-less sudo" >&2
		exit 3
	fi
	exec sudo -E "$0" "$@"
}

# apt-get install the packages (updating the lists once if the first try fails); exit 3 when impossible.
apt_install() {
	log "installing $*"
	command -v apt-get >/dev/null || {
		log "no apt-get here; install $* by hand"
		exit 3
	}
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
		apt-get update -qq >/dev/null 2>&1 || true
		apt-get install -y -qq --no-install-recommends "$@" >/dev/null || {
			log "cannot install $*"
			exit 3
		}
	fi
}

# Print the pid from a pid file when that process is alive (not a zombie) and runs the named program.
alive_pid() {
	local pidfile=$1 name=$2 pid stat
	[[ -r $pidfile ]] || return 1
	pid=$(tr -dc '0-9' 2>/dev/null <"$pidfile")
	[[ -n $pid ]] || return 1
	stat=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
	[[ $stat != Z* && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
	echo "$pid"
}

mark_started() { echo "$1 $2" >>"$DIR/started.list"; }

# Stop in reverse start order; wait for each to exit, SIGKILL after $1 seconds.
stop_started() {
	local list=$DIR/started.list name pidfile pid i
	[[ -s $list ]] || {
		log "nothing started by this script is recorded in $list"
		return 0
	}
	tac "$list" | while read -r name pidfile; do
		pid=$(alive_pid "$pidfile" "$name") || continue
		kill -TERM "$pid"
		for ((i = 0; i < 2 * $1; i++)); do
			alive_pid "$pidfile" "$name" >/dev/null || break
			sleep 0.5
		done
		alive_pid "$pidfile" "$name" >/dev/null && kill -KILL "$pid"
		log "stopped $name (pid $pid)"
	done
	rm -f "$list"
}

# The command line of both scripts: start, stop or status.
dispatch() {
	case ${1:-} in
	start) start ;;
	stop) stop ;;
	status) status ;;
	*)
		echo "usage: $0 {start|stop|status}" >&2
		exit 2
		;;
	esac
}
