#!/usr/bin/env bash
# Stop the dev SLURM started by up.sh (only the daemons whose PIDs it recorded), cancel the
# jobs still queued on it, and remove its state directory and /etc/slurm link.
set -euo pipefail
PROG=down.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/dev/lib.sh
source "$HERE/lib.sh"

cancel_jobs() {
	local jobs i
	pid_of slurmctld >/dev/null || return 0
	jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u) || return 0
	[[ -z $jobs ]] && return 0
	# shellcheck disable=SC2086
	timeout 10 scancel $jobs 2>/dev/null || true
	# Give slurmd the KillWait it needs to end the tasks before it is stopped itself.
	for ((i = 0; i < 50; i++)); do
		[[ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ]] && break
		sleep 0.2
	done
}

main() {
	[[ $(id -u) -eq 0 ]] || die "must run as root"
	if [[ -e $STATE_DIR && ! -e $STATE_DIR/.hpcdeconv-slurm ]]; then
		die "$STATE_DIR was not made by up.sh; refusing to touch it"
	fi
	cancel_jobs
	stop_all
	unlink_etc
	rm -rf "$STATE_DIR"
	log "stopped; $STATE_DIR removed"
}

main "$@"
