#!/usr/bin/env bash
# Tier 5: where a promoted model is registered and served, each installed by its project's own
# kustomization from its pinned source tree (cluster/build.sh registry kserve), with patches of ours:
#   - Kubeflow Model Registry's server (manifests/kustomize/base), in `kubeflow`, storing in tier 3's
#     MariaDB (its own database, model_registry, made by an init container) as upstream's base
#     stores in KFP's: model-registry-service.kubeflow:8080;
#   - KServe's controller in RawDeployment ("Standard") mode (config/overlays/standalone/kserve:
#     CRDs, RBAC, webhooks, the inferenceservice-config ConfigMap, the default ClusterStorageContainer)
#     and its ClusterServingRuntimes (config/runtimes). Neither Knative nor Istio: no Ingress is made
#     (a predictor is its Service). cert-manager's Issuer and Certificate give way to a webhook
#     certificate signed here by the cluster's CA (cluster/certs.sh), its CA in every webhook's
#     caBundle; kube-rbac-proxy (metrics behind auth, an image not built here) is left out.
#
# usage: cluster/serving.sh     (called by cluster/up.sh once tier 3 is up)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the cluster is not up: make cluster-up"
apply() { kubectl_admin apply --server-side --force-conflicts --field-manager=imgpipe-cluster -f - >/dev/null; }
render() { "$(bin_dir control)/kubectl" kustomize --load-restrictor=LoadRestrictionsNone "$1"; }

# DIR: an install folder of ours, emptied; a kustomization's patches are files there (one a file).
install_dir() {
	local dir=$CLUSTER_STATE/install/$1
	mkdir -p "$dir"
	rm -f "$dir"/*.yaml
	echo "$dir"
}

t0=$SECONDS
dir=$(install_dir model-registry)
src=$(realpath --relative-to="$dir" "$(source_tree model-registry)/manifests/kustomize/base")
cat >"$dir/database.yaml" <<EOF2
# The registry's own database in KFP's MariaDB. Upstream's base reads embedmdDb, dbHost and dbPort
# from pipeline-install-config, keys KFP 2.17's does not have (it names mysqlHost and mysqlPort).
# The init container makes the database; the server migrates it.
apiVersion: apps/v1
kind: Deployment
metadata: {name: model-registry-deployment}
spec:
  template:
    spec:
      initContainers:
        - name: database
          image: $(image_ref mariadb)
          command: ["sh", "-c", 'until mariadb -h"\$MYSQL_HOST" -P"\$MYSQL_PORT" -u"\$DBCONFIG_USER" --password="\$DBCONFIG_PASSWORD" -e "CREATE DATABASE IF NOT EXISTS \$MYSQL_DATABASE CHARACTER SET utf8mb4"; do sleep 2; done']
          env:
            - {name: DBCONFIG_USER, valueFrom: {secretKeyRef: {name: mysql-secret, key: username}}}
            - {name: DBCONFIG_PASSWORD, valueFrom: {secretKeyRef: {name: mysql-secret, key: password}}}
            - {name: MYSQL_DATABASE, value: model_registry}
            - {name: MYSQL_HOST, valueFrom: {configMapKeyRef: {name: pipeline-install-config, key: mysqlHost}}}
            - {name: MYSQL_PORT, valueFrom: {configMapKeyRef: {name: pipeline-install-config, key: mysqlPort}}}
          securityContext: {runAsNonRoot: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
      containers:
        - name: rest-container
          env: # replaced whole: a merge would keep the base's valueFrom beside our value
            - \$patch: replace
            - {name: DBCONFIG_USER, valueFrom: {secretKeyRef: {name: mysql-secret, key: username}}}
            - {name: DBCONFIG_PASSWORD, valueFrom: {secretKeyRef: {name: mysql-secret, key: password}}}
            - {name: MYSQL_DATABASE, value: model_registry}
            - {name: MYSQL_HOST, valueFrom: {configMapKeyRef: {name: pipeline-install-config, key: mysqlHost}}}
            - {name: MYSQL_PORT, valueFrom: {configMapKeyRef: {name: pipeline-install-config, key: mysqlPort}}}
EOF2
cat >"$dir/kustomization.yaml" <<EOF2
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: kubeflow
resources: [$src]
patches:
  - path: database.yaml
images:
  - {name: ghcr.io/kubeflow/model-registry/server, newName: $(image_ref model-registry | cut -d: -f1), newTag: "$MODEL_REGISTRY_VERSION"}
EOF2
render "$dir" >"$dir/rendered.yaml"
apply <"$dir/rendered.yaml"
kubectl_admin -n kubeflow rollout status deployment/model-registry-deployment --timeout=300s >/dev/null ||
	die "the Model Registry did not become ready: cluster/kubectl -n kubeflow logs deploy/model-registry-deployment --all-containers"
log "Model Registry $MODEL_REGISTRY_VERSION ready in $((SECONDS - t0)) s (model-registry-service.kubeflow:8080)"

t0=$SECONDS
tree=$(source_tree kserve)
dir=$(install_dir kserve)
# The webhook's serving certificate: cluster/certs.sh signs it with the cluster's CA.
pki=$CLUSTER_STATE/pki
[[ -f $pki/kserve-webhook.crt ]] || die "no $pki/kserve-webhook.crt: this cluster was started before tier 5; make cluster-down, then make cluster-up"
ca=$(base64 -w0 <"$pki/ca.crt")
src=$(realpath --relative-to="$dir" "$tree/config")
for kind in Issuer Certificate; do
	# shellcheck disable=SC2016 # kustomize's $patch, not a variable
	printf 'apiVersion: cert-manager.io/v1\nkind: %s\nmetadata: {name: %s, namespace: kserve}\n$patch: delete\n' \
		"$kind" "$([[ $kind == Issuer ]] && echo selfsigned-issuer || echo serving-cert)" >"$dir/no-$kind.yaml"
done
cat >"$dir/manager.yaml" <<'EOF2'
apiVersion: apps/v1
kind: Deployment
metadata: {name: kserve-controller-manager, namespace: kserve}
spec:
  template:
    spec:
      containers:
        - {name: kube-rbac-proxy, $patch: delete}
        # upstream's Always (no registry here); a 10m request (upstream's 100m): a 2-core node runs a
        # pipeline's RayJob and TrainJob beside it
        - {name: manager, imagePullPolicy: IfNotPresent, resources: {requests: {cpu: 10m}}}
EOF2
# KServe v0.20 installs standalone from config/overlays/standalone/kserve; v0.15 and v0.16 (Kubeflow
# v1.11's and 26.03's) from config/default, which also holds the LocalModel controller and node agent
# (images not built here, and unused by imgpipe: left out). v0.16 renamed RawDeployment to Standard
# and still takes the old name; v0.15 knows RawDeployment alone.
overlay=$src/overlays/standalone/kserve extra_patches=""
if [[ ! -d $tree/config/overlays/standalone/kserve ]]; then
	overlay="$src/default, $src/storagecontainers" # v0.20's overlay holds the default ClusterStorageContainer; here it is apart
	for pair in Deployment:kserve-localmodel-controller-manager DaemonSet:kserve-localmodelnode-agent; do
		# shellcheck disable=SC2016 # kustomize's $patch, not a variable
		printf 'apiVersion: apps/v1\nkind: %s\nmetadata: {name: %s, namespace: kserve}\n$patch: delete\n' "${pair%%:*}" "${pair#*:}" >"$dir/no-${pair#*:}.yaml"
		extra_patches+="  - path: no-${pair#*:}.yaml"$'\n'
	done
	# v0.16's config/default also holds the LLMInferenceService controller (its image is not built here,
	# imgpipe does not use it) with a cert-manager Certificate and webhooks of its own: left out, with
	# the LLMInferenceServiceConfigs its webhook would have to admit. Targets that match nothing (v0.15) are no error.
	for target in Deployment:llmisvc-controller-manager Certificate:llmisvc-serving-cert \
		"ValidatingWebhookConfiguration:llminferenceservice.*" "LLMInferenceServiceConfig:.*"; do
		extra_patches+="  - target: {kind: ${target%%:*}, name: \"${target#*:}\"}
    patch: |-
      \$patch: delete
      kind: ${target%%:*}
      metadata: {name: any}
"
	done
fi
mode=Standard
[[ $(printf '%s\n' "$KSERVE_VERSION" v0.16.0 | sort -V | head -n1) == v0.16.0 ]] || mode=RawDeployment
storage_initializer=$(image_ref kserve-storage-initializer)
cat >"$dir/config.yaml" <<EOF2
apiVersion: v1
kind: ConfigMap
metadata: {name: inferenceservice-config, namespace: kserve}
data:
  deploy: '{"defaultDeploymentMode": "$mode"}'
  storageInitializer: '{"image": "$storage_initializer", "memoryRequest": "100Mi", "memoryLimit": "1Gi", "cpuRequest": "100m", "cpuLimit": "1", "caBundleConfigMapName": "", "caBundleVolumeMountPath": "/etc/ssl/custom-certs", "enableModelcar": false, "cpuModelcar": "10m", "memoryModelcar": "15Mi", "uidModelcar": 1010}'
  ingress: '{"enableGatewayApi": false, "kserveIngressGateway": "kserve/kserve-ingress-gateway", "ingressGateway": "knative-serving/knative-ingress-gateway", "localGateway": "knative-serving/knative-local-gateway", "localGatewayService": "knative-local-gateway.istio-system.svc.cluster.local", "ingressDomain": "example.com", "ingressClassName": "istio", "domainTemplate": "{{ .Name }}-{{ .Namespace }}.{{ .IngressDomain }}", "urlScheme": "http", "disableIstioVirtualHost": true, "disableIngressCreation": true, "disableHTTPRouteTimeout": false}'
---
apiVersion: serving.kserve.io/v1alpha1
kind: ClusterStorageContainer
metadata: {name: default}
spec:
  container: {name: storage-initializer, image: $storage_initializer}
EOF2
cat >"$dir/kustomization.yaml" <<EOF2
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [$overlay]
patches:
  - path: no-Issuer.yaml
  - path: no-Certificate.yaml
  - path: manager.yaml
  - path: config.yaml
$extra_patches  - target: {kind: MutatingWebhookConfiguration}
    patch: |-
      - {op: add, path: /webhooks/0/clientConfig/caBundle, value: $ca}
      - {op: add, path: /webhooks/1/clientConfig/caBundle, value: $ca}
  - target: {kind: ValidatingWebhookConfiguration}
    patch: |-
      - {op: add, path: /webhooks/0/clientConfig/caBundle, value: $ca}
images:
  - {name: kserve/kserve-controller, newName: $(image_ref kserve-controller | cut -d: -f1), newTag: "$KSERVE_VERSION"}
secretGenerator:
  - name: kserve-webhook-server-cert
    namespace: kserve
    type: kubernetes.io/tls
    files: [tls.crt=$pki/kserve-webhook.crt, tls.key=$pki/kserve-webhook.key]
    options: {disableNameSuffixHash: true}
EOF2
render "$dir" >"$dir/rendered.yaml"
grep -q 'cert-manager.io/v1' "$dir/rendered.yaml" && die "KServe's install still holds cert-manager's resources: $dir/rendered.yaml"
# The CRDs first (the same ones the overlay holds), established before the custom resources it holds.
render "$tree/config/crd" | apply
kubectl_admin wait --for=condition=Established --timeout=60s crd --all >/dev/null
apply <"$dir/rendered.yaml"
kubectl_admin -n kserve rollout status deployment/kserve-controller-manager --timeout=300s >/dev/null ||
	die "KServe's controller did not become ready: cluster/kubectl -n kserve logs deploy/kserve-controller-manager"
# The runtimes go through KServe's own webhook: retry while it starts serving.
for _ in $(seq 30); do
	render "$tree/config/runtimes" 2>/dev/null | apply 2>/dev/null && break
	sleep 2
done
kubectl_admin get clusterservingruntime kserve-tritonserver >/dev/null || die "KServe's ClusterServingRuntimes were not installed"
log "KServe $KSERVE_VERSION ($mode) ready in $((SECONDS - t0)) s"
