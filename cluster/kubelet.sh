#!/usr/bin/env bash
# A node's kubelet alone, stopped or started again while the rest of the cluster runs: the one
# way cluster/node.sh starts it, and the fault tests' way to take a node away from a run
# (tests/cluster/test_kfp_faults.py). Its pods' containers keep running under containerd while it
# is stopped, as on a node whose kubelet crashed or was restarted for an upgrade.
#
# usage: cluster/kubelet.sh start|stop [INDEX]    (INDEX: the node, 0 the control node, the default)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the cluster is not up: make cluster-up"
index=${2:-0}
[[ $index =~ ^[0-9]+$ ]] || die "usage: cluster/kubelet.sh start|stop [INDEX]"
daemon=$(node_daemon kubelet "$index")
state=$(node_state "$index")
pidfile=$CLUSTER_STATE/run/$daemon.pid

alive() { [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case ${1:-} in
start)
	alive && die "$daemon is already running (pid $(cat "$pidfile"))"
	[[ -s $state/kubelet.yaml ]] || die "no $state/kubelet.yaml: cluster/node.sh writes it (make cluster-up)"
	start_daemon_on "$index" "$daemon" "$(bin_dir node)/kubelet" --config="$state/kubelet.yaml" \
		--kubeconfig="$state/kubelet.kubeconfig" --root-dir="$state/kubelet" \
		--hostname-override="$(node_name "$index")" --node-ip="$(node_ip "$index")"
	;;
stop)
	alive || die "$daemon is not running"
	pid=$(cat "$pidfile")
	kill -TERM "$pid"
	for _ in $(seq 150); do
		kill -0 "$pid" 2>/dev/null || exit 0
		sleep 0.2
	done
	die "$daemon (pid $pid) did not stop in 30 s"
	;;
*) die "usage: cluster/kubelet.sh start|stop [INDEX]" ;;
esac
