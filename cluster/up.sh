#!/usr/bin/env bash
# Starts the cluster from the cached binaries (cluster/build.sh), inside a network and mount
# namespace of its own: nothing it serves or calls leaves that namespace, kubelet's sysctl writes
# land on files of ours, and every process sits in one cgroup parent (cluster/down.sh removes all).
#
# usage: [NODES=N] cluster/up.sh
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the CRDs; then, where their
#   binaries are built, N nodes (node.sh: the control node, and N-1 workers, default none), Argo and
#   KubeRay (controllers.sh), JobSet and Trainer (trainer.sh), KFP (kfp.sh), the Model Registry
#   and KServe (serving.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"

CONTROL_BIN=$(bin_dir control)
# A release profile runs whole or not at all: each group it needs must be built for its versions.
# `current` may run with only the lower tiers built (make cluster-build GROUPS=...).
missing=$(unbuilt_groups)
if [[ -n $missing && ( $CLUSTER_RELEASE != current || ! -x $CONTROL_BIN/kube-apiserver ) ]]; then
	die "CLUSTER_RELEASE=$CLUSTER_RELEASE has no build in $CLUSTER_CACHE of:$missing; run $(build_command)"
fi

if cluster_running; then
	log "already up (namespace holder pid $(holder_pid)); make cluster-down stops it"
	exit 0
fi
[[ $NODES =~ ^[1-9]$ ]] || die "NODES=$NODES: the number of nodes, 1 to 9 (1 fits 2 cores)"
[[ ! -e $CLUSTER_STATE ]] || die "$CLUSTER_STATE exists but no cluster runs: make cluster-down clears it"
mkdir -p "$CLUSTER_STATE"/{run,log,sysctl,sysctl-machine}
echo "$CLUSTER_RELEASE" >"$CLUSTER_STATE/release" # what the scripts and tests read while it runs
echo "$NODES" >"$CLUSTER_STATE/nodes"
PKI=$CLUSTER_STATE/pki

# The cgroup parent, in every v1 hierarchy; a child "control" for the daemons started here.
make_cgroups() {
	local c dir
	for c in $(cgroup_controllers); do
		for dir in "/sys/fs/cgroup/$c/$CLUSTER_CGROUP" "/sys/fs/cgroup/$c/$CLUSTER_CGROUP/control"; do
			mkdir -p "$dir"
			if [[ $c == cpuset ]]; then # a v1 cpuset takes tasks only once it has cpus and mems
				cat "$(dirname "$dir")/cpuset.cpus" >"$dir/cpuset.cpus"
				cat "$(dirname "$dir")/cpuset.mems" >"$dir/cpuset.mems"
			fi
		done
	done
}

# The namespace holder: a process that does nothing in a new network and mount namespace
# (mounts made there stay there); every daemon joins its namespaces.
start_holder() {
	# shellcheck disable=SC2016 # expanded by the inner bash
	setsid unshare --net --mount --propagation private -- bash -c '
		for c in $1; do echo $$ >"/sys/fs/cgroup/$c/$2/control/cgroup.procs"; done
		exec -a imgpipe-cluster-holder sleep infinity' _ "$(cgroup_controllers | tr '\n' ' ')" "$CLUSTER_CGROUP" \
		</dev/null >/dev/null 2>&1 &
	echo $! >"$CLUSTER_STATE/run/holder.pid"
	for _ in $(seq 50); do
		cluster_running && return 0
		sleep 0.1
	done
	die "the namespace holder did not start"
}

# Inside the namespace: loopback, carrying the node's address too (Kubernetes refuses 127.0.0.0/8
# for a node or an endpoint; this kernel has no dummy interfaces), and the masked sysctls.
setup_namespace() {
	in_cluster ip link set lo up
	in_cluster ip addr add "$CLUSTER_NODE_IP/32" dev lo
	# Service addresses need a route for the node's own connections (kube-proxy's DNAT comes
	# after the routing decision); a node's default route would give them one.
	in_cluster ip route add "$CLUSTER_SERVICE_CIDR" dev lo src "$CLUSTER_NODE_IP"
	local s file
	for s in $CLUSTER_MASKED_SYSCTLS; do
		[[ -e /proc/sys/$s ]] || continue
		file=$CLUSTER_STATE/sysctl/${s//\//.}
		cat "/proc/sys/$s" >"$file"
		cat "/proc/sys/$s" >"$CLUSTER_STATE/sysctl-machine/${s//\//.}" # what the machine had
		in_cluster mount --bind "$file" "/proc/sys/$s"
	done
}

start_control() {
	local b=$CONTROL_BIN t0=$SECONDS
	start_daemon etcd "$b/etcd" --name=imgpipe --data-dir="$CLUSTER_STATE/etcd" \
		--listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
		--listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
		--initial-cluster=imgpipe=http://127.0.0.1:2380 --listen-metrics-urls=http://127.0.0.1:2381
	wait_for etcd 60 curl -sf http://127.0.0.1:2379/health
	start_daemon kube-apiserver "$b/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
		--bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$CLUSTER_NODE_IP" \
		--service-cluster-ip-range="$CLUSTER_SERVICE_CIDR" \
		--tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
		--kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
		--kubelet-preferred-address-types=InternalIP \
		--service-account-issuer="https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
		--service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
		--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true \
		--profiling=false --endpoint-reconciler-type=lease
	wait_for kube-apiserver 120 curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$CLUSTER_API/readyz"
	start_daemon kube-controller-manager "$b/kube-controller-manager" --kubeconfig="$CLUSTER_STATE/controller-manager.kubeconfig" \
		--authentication-kubeconfig="$CLUSTER_STATE/controller-manager.kubeconfig" \
		--authorization-kubeconfig="$CLUSTER_STATE/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
		--service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
		--cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
		--allocate-node-cidrs=true --cluster-cidr="$CLUSTER_POD_CIDR" --service-cluster-ip-range="$CLUSTER_SERVICE_CIDR" \
		--node-cidr-mask-size=24 --profiling=false
	start_daemon kube-scheduler "$b/kube-scheduler" --kubeconfig="$CLUSTER_STATE/scheduler.kubeconfig" \
		--authentication-kubeconfig="$CLUSTER_STATE/scheduler.kubeconfig" \
		--authorization-kubeconfig="$CLUSTER_STATE/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --profiling=false
	wait_for kube-controller-manager 60 curl -sfk https://127.0.0.1:10257/healthz
	wait_for kube-scheduler 60 curl -sfk https://127.0.0.1:10259/healthz
	# The controller manager makes the default service account of a namespace; wait for it.
	wait_for kube-controller-manager 60 "$b/kubectl" --kubeconfig="$CLUSTER_STATE/admin.kubeconfig" -n default get serviceaccount default
	log "control plane ready in $((SECONDS - t0)) s"
	"$here/crds.sh"
}

log "release $CLUSTER_RELEASE (KFP $KFP_VERSION), $NODES node(s), state in $CLUSTER_STATE, binaries from $CLUSTER_CACHE"
make_cgroups
start_holder
setup_namespace
"$here/certs.sh" "$PKI"
kubeconfig admin admin
kubeconfig controller-manager controller-manager
kubeconfig scheduler scheduler
kubeconfig kube-proxy kube-proxy
kubeconfig kubelet kubelet
start_control
if [[ -x $(bin_dir node)/kubelet && -x $(bin_dir runtime)/containerd && -x $(bin_dir pause)/pause ]]; then
	for ((i = 0; i < NODES; i++)); do "$here/node.sh" "$i"; done
	[[ -x $(bin_dir argo)/workflow-controller ]] && "$here/controllers.sh"
	[[ -x $(bin_dir trainer)/trainer-controller-manager ]] && "$here/trainer.sh"
	[[ -x $(bin_dir kfp)/apiserver ]] && "$here/kfp.sh"
	[[ -x $(bin_dir kfp)/apiserver && -x $(bin_dir kfp-old)/apiserver ]] && "$here/kfp-old.sh"
	[[ -x $(bin_dir kfp)/apiserver && -x $(bin_dir registry)/model-registry && -x $(bin_dir kserve)/manager ]] && "$here/serving.sh"
else
	log "no node binaries: control plane only (make cluster-build builds them)"
fi
log "up: cluster/kubectl get nodes,pods -A   (make cluster-down stops it)"
