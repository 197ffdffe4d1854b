#!/usr/bin/env bash
# Installs the CRDs of the pinned versions into the running cluster, each taken from its upstream
# module in the Go module cache (fetched through the proxy if missing): Argo Workflows, KubeRay,
# Kubeflow Trainer and JobSet. Server-side apply, then wait until each is Established.
#
# usage: cluster/crds.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"

# MODULE VERSION SUBDIR: a folder of the module in the cache.
module_dir() {
	local dir
	dir=$(module_path "$1" "$2")
	[[ -d $dir/$3 ]] || {
		echo "no $3 in $1@$2" >&2
		return 1
	}
	echo "$dir/$3"
}

# The CRD folders: what each project's own install applies.
crd_dirs() {
	module_dir github.com/argoproj/argo-workflows/v3 "$ARGO_VERSION" manifests/base/crds/full
	module_dir github.com/ray-project/kuberay/ray-operator "$KUBERAY_VERSION" config/crd/bases
	module_dir github.com/kubeflow/trainer/v2 "$TRAINER_VERSION" manifests/base/crds
	module_dir sigs.k8s.io/jobset "$JOBSET_VERSION" config/components/crd/bases
}

kubectl=("$(bin_dir control)/kubectl" --kubeconfig="$CLUSTER_STATE/admin.kubeconfig")
files=()
for dir in $(crd_dirs); do
	while IFS= read -r f; do files+=("$f"); done < <(find "$dir" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
done
for f in "${files[@]}"; do
	in_cluster "${kubectl[@]}" apply --server-side --force-conflicts --field-manager=imgpipe-cluster -f "$f" >/dev/null
done
in_cluster "${kubectl[@]}" wait --for=condition=Established --timeout=60s crd --all >/dev/null
log "${#files[@]} CRDs installed: $(in_cluster "${kubectl[@]}" get crd -o name | sed 's|.*/||' | tr '\n' ' ')"
