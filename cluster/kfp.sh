#!/usr/bin/env bash
# Tier 3: Kubeflow Pipelines' backend, built from its own source (cluster/build.sh kfp), installed
# by KFP 2.17.0's own multi-user kustomization from that source tree with cluster/kfp/patches.yaml
# over it: the API server (multi-user: its own TokenReview and SubjectAccessReview), the persistence
# agent, the ScheduledWorkflow controller, MLMD (cluster/mlmd), the database (MariaDB) and KFP's UI
# (ml-pipeline-ui, built by cluster/build.sh ui from the same tree); and the
# object store the pipeline root lives on, SeaweedFS, as a daemon on the node's address behind the
# `seaweedfs.kubeflow` Service (8333, and 9000, the launcher's default). Its admin keys are in the
# `mlpipeline-minio-artifact` Secret and in $CLUSTER_STATE/kfp/s3.env (readable by root alone).
#
# usage: cluster/kfp.sh     (called by cluster/up.sh once the node, Argo and KubeRay are up)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the cluster is not up: make cluster-up"
tree=$(kfp_tree)
state=$CLUSTER_STATE/kfp
mkdir -p "$state"
chmod 700 "$state"

# The object store: weed on the node's address, S3 on KFP_S3_PORT, its other ports there too.
t0=$SECONDS
if [[ ! -f $state/s3.env ]]; then
	umask 077
	printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$(openssl rand -hex 10)" "$(openssl rand -hex 20)" >"$state/s3.env"
	umask 022
fi
# shellcheck source=/dev/null
. "$state/s3.env"
umask 077
jq -n --arg a "$AWS_ACCESS_KEY_ID" --arg s "$AWS_SECRET_ACCESS_KEY" \
	'{identities: [{name: "admin", credentials: [{accessKey: $a, secretKey: $s}], actions: ["Admin", "Read", "Write", "List", "Tagging"]}]}' \
	>"$state/s3.json"
umask 022
mkdir -p "$state/seaweedfs"
start_daemon seaweedfs "$(bin_dir store)/weed" server -ip="$CLUSTER_NODE_IP" -ip.bind="$CLUSTER_NODE_IP" \
	-dir="$state/seaweedfs" -master.port=19333 -volume.port=18080 -filer.port=18888 -s3 -s3.port="$KFP_S3_PORT" \
	-s3.config="$state/s3.json" -volume.max=0 -master.volumeSizeLimitMB=256
wait_for seaweedfs 60 curl -s -o /dev/null -w '%{http_code}' "http://$CLUSTER_NODE_IP:$KFP_S3_PORT/"
log "SeaweedFS $SEAWEEDFS_VERSION ready in $((SECONDS - t0)) s (S3 on $CLUSTER_NODE_IP:$KFP_S3_PORT)"

kubectl_admin apply --server-side --force-conflicts --field-manager=imgpipe-cluster -f - >/dev/null <<EOF2
apiVersion: v1
kind: Namespace
metadata: {name: kubeflow}
---
apiVersion: v1
kind: Service
metadata: {name: seaweedfs, namespace: kubeflow}
spec:
  # Upstream's seaweedfs Service's S3 ports (third-party/seaweedfs): 8333, and 9000 for older configs.
  ports:
    - {name: http-s3, port: 8333, targetPort: $KFP_S3_PORT, protocol: TCP}
    - {name: http-s3-compat, port: 9000, targetPort: $KFP_S3_PORT, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: seaweedfs-cluster, namespace: kubeflow, labels: {kubernetes.io/service-name: seaweedfs}}
addressType: IPv4
endpoints: [{addresses: ["$CLUSTER_NODE_IP"]}]
ports: [{name: http-s3, port: $KFP_S3_PORT, protocol: TCP}, {name: http-s3-compat, port: $KFP_S3_PORT, protocol: TCP}]
---
# The object store's older name: KFP 2.15's API server and launcher call minio-service:9000 (Kubeflow
# v1.11's manifests keep that Service as an alias of SeaweedFS; 2.16 dropped it).
apiVersion: v1
kind: Service
metadata: {name: minio-service, namespace: kubeflow}
spec:
  ports: [{name: http, port: 9000, targetPort: $KFP_S3_PORT, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: minio-service-seaweedfs, namespace: kubeflow, labels: {kubernetes.io/service-name: minio-service}}
addressType: IPv4
endpoints: [{addresses: ["$CLUSTER_NODE_IP"]}]
ports: [{name: http, port: $KFP_S3_PORT, protocol: TCP}]
---
apiVersion: v1
kind: Secret
metadata: {name: mlpipeline-minio-artifact, namespace: kubeflow}
stringData: {accesskey: "$AWS_ACCESS_KEY_ID", secretkey: "$AWS_SECRET_ACCESS_KEY"}
EOF2

# KFP's own kustomization from the source tree, our patches over it, our images in place of upstream's.
t0=$SECONDS
dir=$CLUSTER_STATE/install/kfp
mkdir -p "$dir"
# One file a patch (kustomize 5.5 crashes on a `$patch: delete` inside a file of several).
rm -f "$dir"/patch-*.yaml
# The database's files: uid 999 is the mysql Deployment's runAsUser.
install -d -o 999 -g 999 -m 700 "$state/mariadb"
sed -e "s|KFP_DRIVER_IMAGE|$(image_ref kfp-driver)|" -e "s|KFP_LAUNCHER_IMAGE|$(image_ref kfp-launcher)|" \
	-e "s|KFP_DATABASE_DIR|$state/mariadb|" "$here/kfp/patches.yaml" |
	csplit -s -z -f "$dir/patch-" -b '%02d.yaml' - '/^---$/' '{*}'
src=$(realpath --relative-to="$dir" "$tree/manifests/kustomize")
ref() { image_ref "$1" | cut -d: -f1; }
tag() { image_ref "$1" | cut -d: -f2; }
cat >"$dir/kustomization.yaml" <<EOF2
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: kubeflow
resources:
  - $src/base/installs/multi-user
  - $src/base/metadata/base
  - $src/third-party/mysql/base
patches:
$(cd "$dir" && printf '  - path: %s\n' patch-*.yaml)
images:
  - {name: ghcr.io/kubeflow/kfp-api-server, newName: $(ref kfp-api-server), newTag: "$(tag kfp-api-server)"}
  - {name: ghcr.io/kubeflow/kfp-persistence-agent, newName: $(ref kfp-persistence-agent), newTag: "$(tag kfp-persistence-agent)"}
  - {name: ghcr.io/kubeflow/kfp-scheduled-workflow-controller, newName: $(ref kfp-scheduledworkflow), newTag: "$(tag kfp-scheduledworkflow)"}
  - {name: ghcr.io/kubeflow/kfp-frontend, newName: $(ref kfp-ui), newTag: "$(tag kfp-ui)"}
  - {name: gcr.io/tfx-oss-public/ml_metadata_store_server, newName: $(ref mlmd), newTag: "$(tag mlmd)"}
  - {name: mysql, newName: $(ref mariadb), newTag: "$(tag mariadb)"}
  # The wait-for init containers need a shell and nc: the Debian base has both.
  - {name: docker.io/alpine, newName: $(ref debian), newTag: "$(tag debian)"}
EOF2
"$(bin_dir control)/kubectl" kustomize --load-restrictor=LoadRestrictionsNone "$dir" >"$dir/rendered.yaml"
kubectl_admin apply --server-side --force-conflicts --field-manager=imgpipe-cluster -f - <"$dir/rendered.yaml" >/dev/null
for d in mysql metadata-grpc-deployment ml-pipeline ml-pipeline-persistenceagent ml-pipeline-scheduledworkflow ml-pipeline-ui; do
	kubectl_admin -n kubeflow rollout status "deployment/$d" --timeout=300s >/dev/null ||
		die "KFP's $d did not become ready: cluster/kubectl -n kubeflow get pods; cluster/kubectl -n kubeflow logs deploy/$d"
done
log "Kubeflow Pipelines $KFP_VERSION ready in $((SECONDS - t0)) s (ml-pipeline.kubeflow:8888)"
