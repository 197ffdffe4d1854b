#!/usr/bin/env bash
# Tier 2, a node: containerd (runc, the CNI bridge), the cluster's images, kubelet and kube-proxy,
# in the namespaces and cgroup cluster/up.sh made; on the control-plane node (INDEX 0) CoreDNS too.
# A worker (INDEX 1..) gets its own network namespace first (cluster/worker.sh). Every path they
# write is under the state directory: what their defaults would put elsewhere on the machine (CNI's
# cache, pods' network namespaces, pod logs, NRI's socket) is pointed there or bind-mounted there
# inside the cluster's mount namespace.
#
# usage: cluster/node.sh [INDEX]    (called by cluster/up.sh when the node binaries are built)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the control plane is not up: make cluster-up"
index=${1:-0}
[[ $index =~ ^[0-9]+$ ]] || die "usage: cluster/node.sh [INDEX]"

NODE_BIN=$(bin_dir node)
RUNTIME_BIN=$(bin_dir runtime)
PKI=$CLUSTER_STATE/pki
name=$(node_name "$index")
ip=$(node_ip "$index")
state=$(node_state "$index")
CTD=$state/containerd
SOCK=$(node_socket "$index")
RUNC=$(command -v runc) || die "runc is missing: apt-get install runc containernetworking-plugins iptables (make cluster-build does)"
[[ -x $CNI_BIN/bridge ]] || die "no CNI plugins in $CNI_BIN: apt-get install containernetworking-plugins"
command -v iptables >/dev/null || die "iptables is missing (kube-proxy): apt-get install iptables"

mkdir -p "$CTD" "$state"/{cni,cni-ipam,kubelet,pod-logs}

mount_point() { # PATH: made if missing, recorded so that cluster/down.sh removes it again
	[[ -d $1 ]] && return 0
	mkdir -p "$1"
	echo "$1" >>"$CLUSTER_STATE/run/made-dirs"
}

if ((index == 0)); then
	# Paths fixed in the code, whatever the configuration says: inside the namespace they are ours,
	# and every node's (keys are container ids and sockets' hashes of their containerd's address).
	mkdir -p "$CLUSTER_STATE"/{cni-cache,run-containerd}
	# The CNI cache (go-cni: /var/lib/cni):
	mount_point /var/lib/cni
	in_cluster mount --bind "$CLUSTER_STATE/cni-cache" /var/lib/cni
	# containerd's shims put their sockets in /run/containerd/s whatever its state dir is.
	mount_point /run/containerd
	in_cluster mount --bind "$CLUSTER_STATE/run-containerd" /run/containerd
	# Pods reach the API server and CoreDNS through Service addresses on this bridge.
	in_cluster sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
	pod_cidr=$CLUSTER_NODE_POD_CIDR
else
	"$here/worker.sh" "$index" # its network namespace, its addresses and routes
	in_node "$index" sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
	# The cgroup kubelet puts this node's pods under: beside the control node's, never inside it.
	for c in $(cgroup_controllers); do
		dir=/sys/fs/cgroup/$c/$CLUSTER_CGROUP/$name
		mkdir -p "$dir"
		if [[ $c == cpuset ]]; then
			cat "/sys/fs/cgroup/cpuset/$CLUSTER_CGROUP/cpuset.cpus" >"$dir/cpuset.cpus"
			cat "/sys/fs/cgroup/cpuset/$CLUSTER_CGROUP/cpuset.mems" >"$dir/cpuset.mems"
		fi
	done
fi

cat >"$CTD/config.toml" <<EOF
version = 3
root = '$CTD/root'
state = '$CTD/state'
[grpc]
  address = '$SOCK'
[plugins.'io.containerd.nri.v1.nri']
  # Its default socket is the machine's /var/run/nri/nri.sock.
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '$(image_ref pause)'
[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here: a container may not get a lower oom_score_adj than containerd's.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = '$RUNC'
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['$CNI_BIN']
    conf_dir = '$state/cni'
EOF
if ((index > 0)); then
	# A worker's blobs are hard links of the control node's (cluster/images.sh share), which its
	# metadata records only once an image is shared. containerd's collector deletes blobs it has no
	# record of (after every import's lease ends): it took the links, raced the imports (a short
	# read) and made each worker a full copy. Here it runs only when asked; the cluster is thrown
	# away whole.
	cat >>"$CTD/config.toml" <<-EOF
		[plugins.'io.containerd.gc.v1.scheduler']
		  startup_delay = '0s'
		  deletion_threshold = 1000000000
		  mutation_threshold = 1000000000
	EOF
fi

t0=$SECONDS
start_daemon_on "$index" "$(node_daemon containerd "$index")" "$RUNTIME_BIN/containerd" --config "$CTD/config.toml"
wait_for "$(node_daemon containerd "$index")" 60 "$RUNTIME_BIN/ctr" --address "$SOCK" version
if ((index == 0)); then
	"$here/images.sh" import
else # the control node's images, its blobs hard-linked (cluster/images.sh share)
	NODE_INDEX=$index "$here/images.sh" share
fi

# Pods resolve through CoreDNS; what kubelet hands a pod with dnsPolicy Default leads nowhere.
echo "options ndots:1" >"$CLUSTER_STATE/resolv.conf"
cgroup_root=/$CLUSTER_CGROUP
((index == 0)) || cgroup_root+=/$name
cat >"$state/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: $cgroup_root
failCgroupV1: false
failSwapOn: false
clusterDNS: [$CLUSTER_DNS_IP]
clusterDomain: $CLUSTER_DOMAIN
containerRuntimeEndpoint: unix://$SOCK
tlsCertFile: $PKI/$(node_daemon kubelet "$index").crt
tlsPrivateKeyFile: $PKI/$(node_daemon kubelet "$index").key
resolvConf: $CLUSTER_STATE/resolv.conf
podLogsDir: $state/pod-logs
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
protectKernelDefaults: false
serializeImagePulls: false
maxPods: 30
# Absolute floors: a percentage of a large shared disk would evict pods with tens of GB free.
evictionHard: {memory.available: 200Mi, nodefs.available: 2Gi, imagefs.available: 2Gi}
# No image garbage collection: kubelet reads this disk's usage as total minus available (96% on
# a shared machine with 25 GB free) and deleted the images no registry can give back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
if ((index == CLUSTER_GPU_WORKER)); then # what the GPU operator's nodes carry; kubelet may set its own taint
	echo "registerWithTaints: [{key: nvidia.com/gpu, value: present, effect: NoSchedule}]" >>"$state/kubelet.yaml"
fi
"$here/kubelet.sh" start "$index"

if ((index > 0)); then
	# The pod range the controller manager gave this node, for its bridge (as kind's kindnet reads it).
	wait_for "$(node_daemon kubelet "$index")" 120 bash -c "[[ -n \$(\"$(bin_dir control)/kubectl\" --kubeconfig=\"$CLUSTER_STATE/admin.kubeconfig\" get node \"$name\" -o jsonpath='{.spec.podCIDR}') ]]"
	pod_cidr=$(kubectl_admin get node "$name" -o jsonpath='{.spec.podCIDR}')
	# Pod traffic between nodes: through the control node, which routes each node's range to it.
	in_cluster ip route replace "$pod_cidr" via "$ip" dev "$(worker_link "$index")" onlink
fi
cat >"$state/cni/10-imgpipe.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "imgpipe",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$state/cni-ipam",
              "ranges": [[{"subnet": "$pod_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

cat >"$state/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $state/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_POD_CIDR
hostnameOverride: $name
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave conntrack's settings alone: nf_conntrack_max is the machine's, not the namespace's.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
start_daemon_on "$index" "$(node_daemon kube-proxy "$index")" "$NODE_BIN/kube-proxy" --config="$state/kube-proxy.yaml"

wait_for "$(node_daemon kubelet "$index")" 120 "$(bin_dir control)/kubectl" --kubeconfig="$CLUSTER_STATE/admin.kubeconfig" \
	wait --for=condition=Ready "node/$name" --timeout=5s
if ((index == 0)); then
	kubectl_admin label --overwrite node "$name" node-role.kubernetes.io/control-plane= >/dev/null
else
	kubectl_admin label --overwrite node "$name" node-role.kubernetes.io/worker= >/dev/null
fi
if ((index == CLUSTER_GPU_WORKER)); then
	# The labels the GPU operator's feature discovery sets, and one GPU of capacity (faked: nothing
	# runs CUDA here; the scheduler places by it). kubelet keeps a status field it does not manage.
	kubectl_admin label --overwrite node "$name" nvidia.com/gpu.present=true nvidia.com/gpu.product=imgpipe-faked >/dev/null
	kubectl_admin patch node "$name" --subresource=status --type=merge \
		-p '{"status":{"capacity":{"nvidia.com/gpu":"1"},"allocatable":{"nvidia.com/gpu":"1"}}}' >/dev/null
fi
log "node $name ($ip, pods $pod_cidr) Ready in $((SECONDS - t0)) s"
((index == 0)) || exit 0

sed -e "s|@COREDNS_IMAGE@|$(image_ref coredns)|" -e "s|@DNS_IP@|$CLUSTER_DNS_IP|" -e "s|@DOMAIN@|$CLUSTER_DOMAIN|" \
	"$here/manifests/coredns.yaml" | kubectl_admin apply --server-side --field-manager=imgpipe-cluster -f - >/dev/null
kubectl_admin -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null ||
	die "CoreDNS did not become ready: cluster/kubectl -n kube-system describe pods -l k8s-app=kube-dns"
# The daemons in the namespace (controllers that call Services by name, as in-cluster pods do)
# resolve through CoreDNS too: the machine's resolver is not reachable from here anyway.
printf 'nameserver %s\nsearch svc.%s %s\noptions ndots:5\n' "$CLUSTER_DNS_IP" "$CLUSTER_DOMAIN" "$CLUSTER_DOMAIN" >"$CLUSTER_STATE/daemons-resolv.conf"
in_cluster mount --bind "$CLUSTER_STATE/daemons-resolv.conf" /etc/resolv.conf
log "node and CoreDNS ready in $((SECONDS - t0)) s"
