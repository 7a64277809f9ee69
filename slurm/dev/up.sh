#!/usr/bin/env bash
# Bring up a real single-node SLURM for development and CI: munge, a private MariaDB,
# slurmdbd, slurmctld and slurmd, all local and all run as root, state under
# $HPCDECONV_SLURM_STATE (default /tmp/hpcdeconv-slurm).
#
# Idempotent: when the cluster already runs it only prints its environment. stdout carries
# nothing but `export` lines, so `eval "$(slurm/dev/up.sh)"` works; progress goes to stderr.
# Exits non-zero with one line on stderr when it cannot start, leaving no daemon behind.
set -euo pipefail
PROG=up.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/dev/lib.sh
source "$HERE/lib.sh"

CLUSTER=hpcdeconv
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
DB_PORT=${HPCDECONV_SLURM_DB_PORT:-6820}
SLURM_PORTS=(6817 6818 6819)
APT_PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
# slurm-wlm is a metapackage; these are the packages that carry the programs used here.
REQUIRED_PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
MARKER=.hpcdeconv-slurm
HOST=$(hostname -s)
T0=$SECONDS

print_env() { printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"; }

fail() {
	stop_all
	unlink_etc
	die "$*"
}

node_state() { timeout 10 sinfo -h -N -o %t 2>/dev/null; }

node_ready() { [[ "$(node_state)" =~ ^(idle|mix|mixed|alloc|allocated|comp|completing)$ ]]; }

is_running() {
	local d
	for d in "${DAEMONS[@]}"; do
		pid_of "$d" >/dev/null || return 1
	done
	node_ready
}

# wait_for DAEMON SECONDS CMD...: poll CMD until it succeeds; fail early if DAEMON died.
wait_for() {
	local daemon=$1 secs=$2 deadline last
	shift 2
	deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		# Not pid_of: right after the fork the child may not have exec'd the daemon yet.
		if ! kill -0 "$(<"$STATE_DIR/pids/$daemon.pid")" 2>/dev/null; then
			last=$(tail -n 1 "$STATE_DIR/log/$daemon.out" 2>/dev/null || true)
			fail "$daemon exited during start-up (logs in $STATE_DIR/log): ${last:-no output}"
		fi
		((SECONDS < deadline)) || fail "$daemon not ready within ${secs}s (logs in $STATE_DIR/log)"
		sleep 0.2
	done
}

start_daemon() {
	local name=$1
	shift
	# A new session detaches the daemon from the caller's terminal and signals; closed stdio
	# lets a caller that captures our output (subprocess.run) return.
	setsid "$@" </dev/null >>"$STATE_DIR/log/$name.out" 2>&1 &
	echo $! >"$STATE_DIR/pids/$name.pid"
}

missing_packages() {
	local p
	for p in "${REQUIRED_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
			printf '%s ' "$p"
	done
}

apt_install() {
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
		"${APT_PACKAGES[@]}" >>"$STATE_DIR/log/apt.log" 2>&1
}

install_packages() {
	local missing t0=$SECONDS made_policy=0 ok=1
	missing=$(missing_packages)
	[[ -z $missing ]] && return 0
	command -v apt-get >/dev/null || die "missing packages ($missing) and no apt-get to install them"
	log "installing ${APT_PACKAGES[*]} (missing: $missing)"
	# Package scripts would start system-wide munge and MariaDB; policy-rc.d forbids that.
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		made_policy=1
	fi
	if ! apt-cache show "${REQUIRED_PACKAGES[@]}" >/dev/null 2>&1; then
		apt-get update -q >>"$STATE_DIR/log/apt.log" 2>&1 || ok=0
	fi
	if ((ok)) && ! apt_install; then
		# Stale package lists name versions the mirror no longer has.
		apt-get update -q >>"$STATE_DIR/log/apt.log" 2>&1 && apt_install || ok=0
	fi
	((made_policy)) && rm -f /usr/sbin/policy-rc.d
	((ok)) || die "apt-get could not install ${APT_PACKAGES[*]} (see $STATE_DIR/log/apt.log)"
	log "packages installed in $((SECONDS - t0)) s"
}

fresh_state_dir() {
	if [[ -e $STATE_DIR && ! -e $STATE_DIR/$MARKER ]] && [[ -n "$(ls -A "$STATE_DIR")" ]]; then
		die "$STATE_DIR exists and was not made by up.sh; set HPCDECONV_SLURM_STATE elsewhere"
	fi
	rm -rf "$STATE_DIR"
	mkdir -p "$STATE_DIR"/{etc,log,pids,run,ctld,spool,munge}
	chmod 700 "$STATE_DIR" "$STATE_DIR/munge"
	touch "$STATE_DIR/$MARKER"
}

check_ports_free() {
	local port
	for port in "${SLURM_PORTS[@]}" "$DB_PORT"; do
		if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			die "port $port on 127.0.0.1 is in use: another SLURM or database runs here"
		fi
	done
}

render() {
	sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" \
		-e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@DB_PORT@|$DB_PORT|g" \
		-e "s|@DB_PASS@|$DB_PASS|g" -e "s|@FIRST_JOB_ID@|$FIRST_JOB_ID|g" \
		"$HERE/$1" >"$STATE_DIR/etc/$2"
}

write_configs() {
	# nproc obeys OMP_NUM_THREADS, which callers often set to 1; slurmd counts every CPU.
	CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
	# Below what slurmd measures, or it drains the node for "Low RealMemory".
	MEM_MB=$(awk '/^MemAvailable:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
	DB_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
	# Job ids must not repeat across starts, as on a real cluster: mpich names its node's
	# shared-memory segment after the PMI job (SLURM "<job>.<step>"), so a segment left in
	# /dev/shm by a killed rank of job 3 made every later job 3 hang inside MPI_Init. One id
	# per second since 2026 (wrapping below SLURM's maximum of 67108863) starts each cluster
	# above the ids of any earlier one that ran fewer jobs than it lived seconds.
	FIRST_JOB_ID=$((($(date +%s) - 1767225600) % 67000000 + 1000))
	umask 077
	render slurm.conf.in slurm.conf
	render slurmdbd.conf.in slurmdbd.conf
	render mariadb.cnf.in mariadb.cnf
	chmod 644 "$STATE_DIR/etc/slurm.conf"
	chmod 755 "$STATE_DIR/etc"
	umask 022
}

link_etc() {
	mkdir -p "$(dirname "$ETC_LINK")"
	# A link left by an earlier state directory that no longer exists is ours to replace.
	if [[ -L $ETC_LINK && ! -e $ETC_LINK ]]; then
		rm -f "$ETC_LINK"
	fi
	if [[ -e $ETC_LINK ]]; then
		[[ "$(readlink "$ETC_LINK")" == "$SLURM_CONF" ]] ||
			log "$ETC_LINK belongs to another setup and is left alone: export SLURM_CONF"
		return 0
	fi
	ln -s "$SLURM_CONF" "$ETC_LINK"
}

start_munge() {
	local key="$STATE_DIR/munge/munge.key" sock="$STATE_DIR/munge/munge.socket"
	dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
	chmod 400 "$key"
	start_daemon munged munged --foreground --force --socket="$sock" --key-file="$key" \
		--seed-file="$STATE_DIR/munge/munge.seed" --log-file="$STATE_DIR/log/munged.log" \
		--pid-file="$STATE_DIR/run/munged.pid"
	wait_for munged 20 bash -c "munge -n -S '$sock' | unmunge -S '$sock'"
}

start_mariadb() {
	local cnf="$STATE_DIR/etc/mariadb.cnf"
	mariadb-install-db --defaults-file="$cnf" --auth-root-authentication-method=socket \
		--skip-test-db >>"$STATE_DIR/log/mariadb-install.out" 2>&1 ||
		fail "mariadb-install-db failed (see $STATE_DIR/log/mariadb-install.out)"
	start_daemon mariadbd mariadbd --defaults-file="$cnf"
	wait_for mariadbd 60 mariadb-admin --defaults-file="$cnf" ping
	mariadb --defaults-file="$cnf" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
		GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
		fail "could not create the accounting database user"
}

cluster_registered() {
	[[ -n "$(timeout 10 sacctmgr -n -P show cluster "$CLUSTER" format=ControlHost)" ]]
}

start_slurm() {
	start_daemon slurmdbd slurmdbd -D
	wait_for slurmdbd 60 timeout 10 sacctmgr -n -P show cluster
	timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null ||
		fail "sacctmgr could not add cluster $CLUSTER"
	# -c: start from empty state (FirstJobId in slurm.conf keeps job ids from repeating).
	start_daemon slurmctld slurmctld -D -c
	wait_for slurmctld 60 timeout 10 scontrol ping
	start_daemon slurmd slurmd -D -N "$HOST"
	wait_for slurmd 60 node_ready
	wait_for slurmctld 60 cluster_registered
}

main() {
	[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and runs daemons)"
	if is_running; then
		link_etc
		log "already running (state in $STATE_DIR)"
		print_env
		return 0
	fi
	stop_all
	unlink_etc
	fresh_state_dir
	install_packages
	check_ports_free
	write_configs
	link_etc
	start_munge
	start_mariadb
	start_slurm
	log "started cluster $CLUSTER on $HOST ($CPUS CPUs, ${MEM_MB} MB) in $((SECONDS - T0)) s"
	print_env
}

main "$@"
