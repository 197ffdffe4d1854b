#!/usr/bin/env bash
# Makes the cluster's certificates and keys with openssl into DIR (default $CLUSTER_STATE/pki):
# one CA, the API server's serving certificate, a client certificate per component (their
# identities are the ones Kubernetes' RBAC bootstrap policy names), and the service-account
# signing key. Made anew on every `make cluster-up`; nothing here outlives `make cluster-down`.
#
# usage: cluster/certs.sh [DIR]
#        cluster/certs.sh node INDEX    (a worker's kubelet, signed by the CA in $CLUSTER_STATE/pki)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
worker=
if [[ ${1:-} == node ]]; then
	worker=${2:?usage: cluster/certs.sh node INDEX}
	set -- "$CLUSTER_STATE/pki"
	[[ -f $1/ca.key ]] || die "no CA in $1: make cluster-up makes it"
fi
dir=${1:-$CLUSTER_STATE/pki}
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"
umask 077

# NAME SUBJECT [SANS]: a key and a certificate signed by the CA (client and server use).
issue() {
	local name=$1 subject=$2 sans=${3:-}
	openssl req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$name.key" -out "$name.csr" 2>/dev/null
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=serverAuth,clientAuth"
		[[ -z $sans ]] || echo "subjectAltName=$sans"
	} >"$name.ext"
	openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
		-extfile "$name.ext" -out "$name.crt" 2>/dev/null
	rm -f "$name.csr" "$name.ext"
}

# A node's kubelet: the Node authorizer's identity, serving the API server at the node's address.
kubelet_cert() { # INDEX
	local name ip
	name=$(node_name "$1")
	ip=$(node_ip "$1")
	issue "$(node_daemon kubelet "$1")" "/O=system:nodes/CN=system:node:$name" "DNS:$name,DNS:localhost,IP:127.0.0.1,IP:$ip"
}
if [[ -n $worker ]]; then
	kubelet_cert "$worker"
	rm -f ca.srl
	exit 0
fi

openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=imgpipe-cluster-ca" \
	-keyout ca.key -out ca.crt 2>/dev/null

api_sans="DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN"
api_sans+=",DNS:localhost,IP:127.0.0.1,IP:$CLUSTER_NODE_IP,IP:$CLUSTER_API_SERVICE_IP"
issue apiserver "/CN=kube-apiserver" "$api_sans"
issue admin "/O=system:masters/CN=imgpipe-cluster-admin"
issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
issue controller-manager "/CN=system:kube-controller-manager"
issue scheduler "/CN=system:kube-scheduler"
issue kube-proxy "/CN=system:kube-proxy"
kubelet_cert 0
# KServe's webhook server (tier 5, cluster/serving.sh): in place of cert-manager's Certificate.
kserve_webhook=kserve-webhook-server-service.kserve.svc
issue kserve-webhook "/CN=$kserve_webhook" "DNS:$kserve_webhook,DNS:$kserve_webhook.$CLUSTER_DOMAIN"
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
rm -f ca.srl
