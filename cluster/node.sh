#!/usr/bin/env bash
# Tier 2, the node: containerd (runc, the CNI bridge), the cluster's images, kubelet, kube-proxy
# and CoreDNS, in the namespaces and cgroup cluster/up.sh made. Every path they write is under
# the state directory: what their defaults would put elsewhere on the machine (CNI's cache,
# pods' network namespaces, pod logs) is pointed there or bind-mounted there inside the
# cluster's mount namespace.
#
# usage: cluster/node.sh     (called by cluster/up.sh when the node binaries are built)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the control plane is not up: make cluster-up"

NODE_BIN=$(bin_dir node)
RUNTIME_BIN=$(bin_dir runtime)
PKI=$CLUSTER_STATE/pki
CTD=$CLUSTER_STATE/containerd
SOCK=$CTD/containerd.sock
RUNC=$(command -v runc) || die "runc is missing: apt-get install runc containernetworking-plugins iptables (make cluster-build does)"
[[ -x $CNI_BIN/bridge ]] || die "no CNI plugins in $CNI_BIN: apt-get install containernetworking-plugins"
command -v iptables >/dev/null || die "iptables is missing (kube-proxy): apt-get install iptables"

mkdir -p "$CTD" "$CLUSTER_STATE"/{cni,cni-cache,cni-ipam,kubelet,pod-logs,run-containerd}

# Paths fixed in the code, whatever the configuration says: inside the namespace they are ours.
# The CNI cache (go-cni: /var/lib/cni):
mount_point() { # PATH: made if missing, recorded so that cluster/down.sh removes it again
	[[ -d $1 ]] && return 0
	mkdir -p "$1"
	echo "$1" >>"$CLUSTER_STATE/run/made-dirs"
}
mount_point /var/lib/cni
in_cluster mount --bind "$CLUSTER_STATE/cni-cache" /var/lib/cni
# containerd's shims put their sockets in /run/containerd/s whatever its state dir is.
mount_point /run/containerd
in_cluster mount --bind "$CLUSTER_STATE/run-containerd" /run/containerd
# Pods reach the API server and CoreDNS through Service addresses on this bridge.
in_cluster sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1

cat >"$CTD/config.toml" <<EOF
version = 3
root = '$CTD/root'
state = '$CTD/state'
[grpc]
  address = '$SOCK'
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
    conf_dir = '$CLUSTER_STATE/cni'
EOF

cat >"$CLUSTER_STATE/cni/10-imgpipe.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "imgpipe",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$CLUSTER_STATE/cni-ipam",
              "ranges": [[{"subnet": "$CLUSTER_NODE_POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

t0=$SECONDS
start_daemon containerd "$RUNTIME_BIN/containerd" --config "$CTD/config.toml"
wait_for containerd 60 "$RUNTIME_BIN/ctr" --address "$SOCK" version
"$here/images.sh" import

# Pods resolve through CoreDNS; what kubelet hands a pod with dnsPolicy Default leads nowhere.
echo "options ndots:1" >"$CLUSTER_STATE/resolv.conf"
cat >"$CLUSTER_STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$CLUSTER_CGROUP
failCgroupV1: false
failSwapOn: false
clusterDNS: [$CLUSTER_DNS_IP]
clusterDomain: $CLUSTER_DOMAIN
containerRuntimeEndpoint: unix://$SOCK
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
resolvConf: $CLUSTER_STATE/resolv.conf
podLogsDir: $CLUSTER_STATE/pod-logs
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
"$here/kubelet.sh" start

cat >"$CLUSTER_STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $CLUSTER_STATE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_POD_CIDR
hostnameOverride: $CLUSTER_NODE_NAME
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave conntrack's settings alone: nf_conntrack_max is the machine's, not the namespace's.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
start_daemon kube-proxy "$NODE_BIN/kube-proxy" --config="$CLUSTER_STATE/kube-proxy.yaml"

wait_for kubelet 120 "$(bin_dir control)/kubectl" --kubeconfig="$CLUSTER_STATE/admin.kubeconfig" \
	wait --for=condition=Ready "node/$CLUSTER_NODE_NAME" --timeout=5s
log "node Ready in $((SECONDS - t0)) s"

sed -e "s|@COREDNS_IMAGE@|$(image_ref coredns)|" -e "s|@DNS_IP@|$CLUSTER_DNS_IP|" -e "s|@DOMAIN@|$CLUSTER_DOMAIN|" \
	"$here/manifests/coredns.yaml" | kubectl_admin apply --server-side --field-manager=imgpipe-cluster -f - >/dev/null
kubectl_admin -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null ||
	die "CoreDNS did not become ready: cluster/kubectl -n kube-system describe pods -l k8s-app=kube-dns"
# The daemons in the namespace (controllers that call Services by name, as in-cluster pods do)
# resolve through CoreDNS too: the machine's resolver is not reachable from here anyway.
printf 'nameserver %s\nsearch svc.%s %s\noptions ndots:5\n' "$CLUSTER_DNS_IP" "$CLUSTER_DOMAIN" "$CLUSTER_DOMAIN" >"$CLUSTER_STATE/daemons-resolv.conf"
in_cluster mount --bind "$CLUSTER_STATE/daemons-resolv.conf" /etc/resolv.conf
log "node and CoreDNS ready in $((SECONDS - t0)) s"
