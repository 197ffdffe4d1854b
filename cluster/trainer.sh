#!/usr/bin/env bash
# Tier 4: JobSet and Kubeflow Trainer, installed as their projects install them: each one's own
# kustomization from its module in the Go module cache (CRDs, RBAC, the webhooks with the
# certificates their managers make themselves, the manager Deployment), with the manager image
# packed here from the binary cluster/build.sh built; then Trainer's ClusterTrainingRuntimes.
#
# usage: cluster/trainer.sh     (called by cluster/up.sh once the node is up)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the cluster is not up: make cluster-up"

# A module's folder in the cache, relative to DIR (kustomize takes no absolute resources).
module_dir() { # MODULE VERSION DIR
	mkdir -p "$3"
	realpath --relative-to="$3" "$(module_path "$1" "$2")"
}

# DIR KUSTOMIZATION: render a kustomization of ours (it names folders in the module cache) and apply it.
install() {
	local dir=$CLUSTER_STATE/install/$1
	mkdir -p "$dir"
	cat >"$dir/kustomization.yaml"
	"$(bin_dir control)/kubectl" kustomize --load-restrictor=LoadRestrictionsNone "$dir" |
		kubectl_admin apply --server-side --force-conflicts --field-manager=imgpipe-cluster -f - >/dev/null
}

t0=$SECONDS
jobset=$(module_dir sigs.k8s.io/jobset "$JOBSET_VERSION" "$CLUSTER_STATE/install/jobset")
install jobset <<EOF2
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [$jobset/config/default]
# A 50m CPU request (upstream's 500m): on the 2-core node a pipeline's RayJob worker and KServe's
# predictor did not fit beside it (Insufficient cpu).
patches:
  - patch: |-
      {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "jobset-controller-manager", "namespace": "jobset-system"},
       "spec": {"template": {"spec": {"containers": [{"name": "manager", "resources": {"requests": {"cpu": "50m"}}}]}}}}
images:
  - name: us-central1-docker.pkg.dev/k8s-staging-images/jobset/jobset
    newName: $(image_ref jobset | cut -d: -f1)
    newTag: $JOBSET_VERSION
EOF2
kubectl_admin -n jobset-system rollout status deployment/jobset-controller-manager --timeout=180s >/dev/null ||
	die "JobSet's manager did not become ready: cluster/kubectl -n jobset-system get pods"
log "JobSet $JOBSET_VERSION ready in $((SECONDS - t0)) s"

t0=$SECONDS
trainer=$(module_dir github.com/kubeflow/trainer/v2 "$TRAINER_VERSION" "$CLUSTER_STATE/install/trainer")
mkdir -p "$CLUSTER_STATE/install/trainer"
printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: kubeflow-system}\n' >"$CLUSTER_STATE/install/trainer/namespace.yaml"
install trainer <<EOF2
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: kubeflow-system
resources:
  - namespace.yaml
  - $trainer/manifests/base/crds
  - $trainer/manifests/base/manager
  - $trainer/manifests/base/rbac
  - $trainer/manifests/base/webhook
images:
  - name: ghcr.io/kubeflow/trainer/trainer-controller-manager
    newName: $(image_ref trainer | cut -d: -f1)
    newTag: $TRAINER_VERSION
secretGenerator:
  - name: kubeflow-trainer-webhook-cert
    namespace: kubeflow-system
    options: {disableNameSuffixHash: true}
EOF2
kubectl_admin -n kubeflow-system rollout status deployment/kubeflow-trainer-controller-manager --timeout=180s >/dev/null ||
	die "Trainer's manager did not become ready: cluster/kubectl -n kubeflow-system get pods"
# The runtimes go through Trainer's own webhook: retry while it starts serving.
for _ in $(seq 30); do
	"$(bin_dir control)/kubectl" kustomize "$(realpath "$CLUSTER_STATE/install/trainer/$trainer")/manifests/base/runtimes" |
		kubectl_admin apply --server-side --force-conflicts --field-manager=imgpipe-cluster -f - >/dev/null 2>&1 && break
	sleep 2
done
kubectl_admin get clustertrainingruntime torch-distributed >/dev/null || die "the torch-distributed runtime was not installed"
log "Trainer $TRAINER_VERSION and its runtimes ready in $((SECONDS - t0)) s"
