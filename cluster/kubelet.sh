#!/usr/bin/env bash
# The node's kubelet alone, stopped or started again while the rest of the cluster runs: the one
# way cluster/node.sh starts it, and the fault tests' way to take the node away from a run
# (tests/cluster/test_kfp_faults.py). Its pods' containers keep running under containerd while it
# is stopped, as on a node whose kubelet crashed or was restarted for an upgrade.
#
# usage: cluster/kubelet.sh start|stop
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the cluster is not up: make cluster-up"
pidfile=$CLUSTER_STATE/run/kubelet.pid

alive() { [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case ${1:-} in
start)
	alive && die "kubelet is already running (pid $(cat "$pidfile"))"
	[[ -s $CLUSTER_STATE/kubelet.yaml ]] || die "no $CLUSTER_STATE/kubelet.yaml: cluster/node.sh writes it (make cluster-up)"
	start_daemon kubelet "$(bin_dir node)/kubelet" --config="$CLUSTER_STATE/kubelet.yaml" \
		--kubeconfig="$CLUSTER_STATE/kubelet.kubeconfig" --root-dir="$CLUSTER_STATE/kubelet" \
		--hostname-override="$CLUSTER_NODE_NAME" --node-ip="$CLUSTER_NODE_IP"
	;;
stop)
	alive || die "kubelet is not running"
	pid=$(cat "$pidfile")
	kill -TERM "$pid"
	for _ in $(seq 150); do
		kill -0 "$pid" 2>/dev/null || exit 0
		sleep 0.2
	done
	die "kubelet (pid $pid) did not stop in 30 s"
	;;
*) die "usage: cluster/kubelet.sh start|stop" ;;
esac
