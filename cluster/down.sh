#!/usr/bin/env bash
# Stops the cluster and leaves nothing behind: every process in the cluster's cgroup parent
# (each was started by cluster/up.sh or by the cluster itself), the namespaces with them (and so
# every mount made inside), the cgroups, and the state directory. The build cache stays.
#
# usage: cluster/down.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"


# The pids in the cluster's cgroups, in every hierarchy (the union covers strays).
cluster_pids() {
	local d
	for d in $(cluster_cgroup_dirs); do
		find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null
	done | sort -un
}

signal_all() { # SIGNAL
	local pid
	for pid in $(cluster_pids); do kill "-$1" "$pid" 2>/dev/null || true; done
}

if [[ -n $(cluster_pids) ]]; then
	signal_all TERM
	for _ in $(seq 50); do
		[[ -z $(cluster_pids) ]] && break
		sleep 0.2
	done
	if [[ -n $(cluster_pids) ]]; then
		log "killing what did not stop in 10 s: $(cluster_pids | tr '\n' ' ')"
		signal_all KILL
		for _ in $(seq 50); do
			[[ -z $(cluster_pids) ]] && break
			sleep 0.2
		done
	fi
fi
left=$(cluster_pids)
[[ -z $left ]] || {
	log "processes still in the cluster's cgroups: $left"
	exit 1
}

for dir in $(cluster_cgroup_dirs); do
	find "$dir" -depth -type d -exec rmdir {} \;
done

# Mount points cluster/node.sh had to make on the machine (empty directories), and nothing else.
if [[ -f $CLUSTER_STATE/run/made-dirs ]]; then
	while IFS= read -r dir; do rmdir "$dir" 2>/dev/null || log "left $dir: not empty"; done <"$CLUSTER_STATE/run/made-dirs"
fi

# Only a state directory this tooling made: an absolute path named for the cluster.
case $CLUSTER_STATE in
/*imgpipe-cluster*) rm -rf --one-file-system "$CLUSTER_STATE" ;;
*) log "not removing $CLUSTER_STATE: not a path cluster/up.sh makes" ;;
esac
left=$(cluster_cgroup_dirs)
[[ -z $left && ! -e $CLUSTER_STATE ]] || die "left behind: $left $(ls -d "$CLUSTER_STATE" 2>/dev/null)"
log "down: no process, cgroup or state left"
