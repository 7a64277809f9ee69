# Helpers shared by up.sh and down.sh; sourced, never run on its own.
# shellcheck shell=bash

STATE_DIR="${HPCDECONV_SLURM_STATE:-/tmp/hpcdeconv-slurm}"
export SLURM_CONF="$STATE_DIR/etc/slurm.conf"
# The default path that plain `sbatch` reads; linked to our copy only when nothing else owns it.
ETC_LINK=/etc/slurm/slurm.conf

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit 1
}

# Print the PID recorded for daemon $1 if that process still runs under that name; a PID
# reused by an unrelated process is never reported, so it is never signalled.
pid_of() {
	local name=$1 file="$STATE_DIR/pids/$1.pid" pid comm
	[[ -r $file ]] || return 1
	pid=$(<"$file")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
	[[ $comm == "${name:0:15}" ]] || return 1
	printf '%s\n' "$pid"
}

any_alive() {
	local pid
	for pid in "$@"; do
		kill -0 "$pid" 2>/dev/null && return 0
	done
	return 1
}

# Stop the named daemons together: SIGTERM to all, then up to 10 s for them to exit.
stop_daemons() {
	local name pid i pids=() names=()
	for name in "$@"; do
		pid=$(pid_of "$name") || continue
		if kill -TERM "$pid" 2>/dev/null; then
			pids+=("$pid")
			names+=("$name")
		fi
	done
	for ((i = 0; i < 100; i++)); do
		any_alive "${pids[@]}" || break
		sleep 0.1
	done
	for i in "${!pids[@]}"; do
		if kill -0 "${pids[i]}" 2>/dev/null; then
			log "${names[i]} (pid ${pids[i]}) ignored SIGTERM for 10 s; sending SIGKILL"
			kill -KILL "${pids[i]}" 2>/dev/null || true
		fi
	done
	for name in "$@"; do
		rm -f "$STATE_DIR/pids/$name.pid"
	done
}

# Reverse start order, in tiers: slurmctld reports to slurmdbd while it shuts down, and
# both need munge and slurmdbd needs MariaDB until then.
stop_all() {
	stop_daemons slurmd slurmctld
	stop_daemons slurmdbd
	stop_daemons mariadbd munged
}

unlink_etc() {
	if [[ -L $ETC_LINK && "$(readlink "$ETC_LINK")" == "$SLURM_CONF" ]]; then
		rm -f "$ETC_LINK"
	fi
}
