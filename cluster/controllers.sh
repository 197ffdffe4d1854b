#!/usr/bin/env bash
# The controllers imgpipe's objects need, each of the pinned version and cluster-wide: Argo's
# workflow-controller (tier 2, with the emissary executor from the argoexec image built here) and
# the KubeRay operator (tier 4). Each runs as a daemon in the cluster's namespaces, as the control
# plane does, with the admin's credentials, where an install would run it as a pod with its
# ClusterRole.
#
# usage: cluster/controllers.sh     (called by cluster/up.sh once the node is up)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the cluster is not up: make cluster-up"

kubectl_admin apply --server-side --field-manager=imgpipe-cluster -f - >/dev/null <<EOF2
apiVersion: v1
kind: Namespace
metadata: {name: argo}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: workflow-controller-configmap, namespace: argo}
data:
  executor: |
    imagePullPolicy: IfNotPresent
EOF2
t0=$SECONDS
LEADER_ELECTION_DISABLE=true start_daemon workflow-controller "$(bin_dir argo)/workflow-controller" \
	--kubeconfig="$CLUSTER_STATE/admin.kubeconfig" --namespace=argo \
	--configmap=workflow-controller-configmap --executor-image="$(image_ref argoexec)" \
	--executor-image-pull-policy=IfNotPresent
wait_for workflow-controller 60 curl -sf http://127.0.0.1:6060/healthz
log "Argo's workflow-controller ready in $((SECONDS - t0)) s"

if [[ -x $(bin_dir kuberay)/ray-operator ]]; then
	t0=$SECONDS
	start_daemon ray-operator "$(bin_dir kuberay)/ray-operator" -kubeconfig="$CLUSTER_STATE/admin.kubeconfig" \
		-enable-leader-election=false -health-probe-bind-address=127.0.0.1:8082 -metrics-addr=127.0.0.1:8083
	wait_for ray-operator 60 curl -sf http://127.0.0.1:8082/readyz
	log "KubeRay's operator ready in $((SECONDS - t0)) s"
fi
