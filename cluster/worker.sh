#!/usr/bin/env bash
# A worker node's own network namespace, its link to the control-plane node, and its identity.
#
# The namespace holder of worker INDEX is a process that does nothing in a new network namespace,
# started inside the cluster's mount namespace (so the masked sysctls and the state directory's
# bind mounts are the same on every node) and in the cluster's cgroup (cluster/down.sh stops it
# with the rest). A veth joins it to the control node's namespace: the worker's end carries its
# node address, the control node's end routes that address and, once the controller manager has
# given the node a pod range, that range (cluster/node.sh). The control node forwards between
# workers, as a cluster's network does; nothing leaves the cluster's namespaces.
#
# usage: cluster/worker.sh INDEX    (called by cluster/node.sh INDEX for INDEX >= 1)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the control plane is not up: make cluster-up"
index=${1:-}
[[ $index =~ ^[1-9][0-9]*$ ]] || die "usage: cluster/worker.sh INDEX (1 and up)"
name=$(node_name "$index")
ip=$(node_ip "$index")
state=$(node_state "$index")
link=$(worker_link "$index")
pidfile=$CLUSTER_STATE/run/worker-$index.pid
mkdir -p "$state"

if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
	die "$name's namespace already exists (pid $(cat "$pidfile")); make cluster-down clears the cluster"
fi
# shellcheck disable=SC2016 # expanded by the inner bash
setsid nsenter -t "$(holder_pid)" -m -- unshare --net -- bash -c '
	for c in $1; do echo $$ >"/sys/fs/cgroup/$c/$2/control/cgroup.procs"; done
	exec -a "imgpipe-cluster-worker-$3" sleep infinity' _ "$(cgroup_controllers | tr '\n' ' ')" "$CLUSTER_CGROUP" "$index" \
	</dev/null >/dev/null 2>&1 &
echo $! >"$pidfile"
holding() { [[ -r /proc/$(cat "$pidfile")/cmdline ]] && tr '\0' ' ' <"/proc/$(cat "$pidfile")/cmdline" | grep -q "imgpipe-cluster-worker-$index"; }
for _ in $(seq 50); do
	holding && break # exec'd: in its own network namespace
	sleep 0.1
done
holding || die "$name's namespace holder did not start"

in_cluster ip link add "$link" type veth peer name eth0 netns "$(node_pid "$index")"
in_cluster ip link set "$link" up
in_cluster ip route add "$ip/32" dev "$link" src "$CLUSTER_NODE_IP"
in_node "$index" ip link set lo up
in_node "$index" ip addr add "$ip/32" dev eth0
in_node "$index" ip link set eth0 up
in_node "$index" ip route add "$CLUSTER_NODE_IP/32" dev eth0 src "$ip"
# Everything else (the other nodes, their pods, Service addresses before kube-proxy's DNAT) by the control node.
in_node "$index" ip route add default via "$CLUSTER_NODE_IP" dev eth0 src "$ip" onlink

# Its kubelet's identity (the Node authorizer's system:node:NAME), and kubeconfigs that reach the
# API server at the control node's address (127.0.0.1 here is the worker's own loopback).
"$here/certs.sh" node "$index"
kubeconfig kubelet "$(node_daemon kubelet "$index")" "https://$CLUSTER_NODE_IP:6443" "$state/kubelet.kubeconfig"
kubeconfig kube-proxy kube-proxy "https://$CLUSTER_NODE_IP:6443" "$state/kube-proxy.kubeconfig"
log "$name: namespace (pid $(node_pid "$index")), $ip over $link"
