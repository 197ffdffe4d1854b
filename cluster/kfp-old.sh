#!/usr/bin/env bash
# Kubeflow v1.10.2's KFP API server (KFP_OLD_VERSION, built by `make cluster-build GROUPS=kfp-old`),
# beside the running cluster's KFP: what imgpipe's release check is shown refusing
# (tests/cluster/test_kfp_old.py). It runs as its release's image runs it (its own config.json,
# TAG_NAME and COMMIT_SHA as the release build sets them), as a daemon on the node's address, with
# a database of its own in the cluster's MariaDB, the cluster's object store, and the Kubernetes API
# through a kubeconfig (outside a pod it has no service account; KFP falls back to one).
#
# usage: cluster/kfp-old.sh     (called by cluster/up.sh once KFP is up, where the group is built)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
cluster_running || die "the cluster is not up: make cluster-up"
bin=$(bin_dir kfp-old)
[[ -x $bin/apiserver ]] || die "no KFP $KFP_OLD_VERSION API server: make cluster-build GROUPS=kfp-old KFP_SOURCE=<a clone of kubeflow/pipelines>"
state=$CLUSTER_STATE/kfp
[[ -f $state/s3.env ]] || die "the cluster's KFP is not up (no $state/s3.env): cluster/kfp.sh first"
t0=$SECONDS
(
	# shellcheck source=/dev/null
	. "$state/s3.env"
	user=$(kubectl_admin -n kubeflow get secret mysql-secret -o jsonpath='{.data.username}' | base64 -d)
	password=$(kubectl_admin -n kubeflow get secret mysql-secret -o jsonpath='{.data.password}' | base64 -d)
	# Its ScheduledWorkflow client reads $HOME/.kube/config alone (the rest takes $KUBECONFIG).
	home=$state/kfp-old-home
	mkdir -p "$home/.kube"
	install -m 600 "$CLUSTER_STATE/admin.kubeconfig" "$home/.kube/config"
	# What a pod gets from the Services' environment variables: 2.5.0 insists on the visualization server's.
	export TAG_NAME=$KFP_OLD_VERSION COMMIT_SHA=$KFP_OLD_COMMIT POD_NAMESPACE=kubeflow MULTIUSER=true \
		HOME=$home KUBECONFIG=$home/.kube/config \
		ML_PIPELINE_VISUALIZATIONSERVER_SERVICE_HOST=ml-pipeline-visualizationserver.kubeflow ML_PIPELINE_VISUALIZATIONSERVER_SERVICE_PORT=8888 \
		DBCONFIG_MYSQLCONFIG_HOST=mysql.kubeflow DBCONFIG_MYSQLCONFIG_PORT=3306 \
		DBCONFIG_MYSQLCONFIG_USER=$user DBCONFIG_MYSQLCONFIG_PASSWORD=$password \
		DBCONFIG_MYSQLCONFIG_DBNAME="mlpipeline_kfp${KFP_OLD_VERSION//./}" \
		OBJECTSTORECONFIG_HOST=minio-service.kubeflow OBJECTSTORECONFIG_PORT=9000 OBJECTSTORECONFIG_SECURE=false \
		OBJECTSTORECONFIG_BUCKETNAME=mlpipeline \
		OBJECTSTORECONFIG_ACCESSKEY=$AWS_ACCESS_KEY_ID OBJECTSTORECONFIG_SECRETACCESSKEY=$AWS_SECRET_ACCESS_KEY
	unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
	start_daemon kfp-old "$bin/apiserver" --config="$bin" -logtostderr=true \
		--httpPortFlag="$CLUSTER_NODE_IP:$KFP_OLD_PORT" --rpcPortFlag="$CLUSTER_NODE_IP:$((KFP_OLD_PORT - 1))"
)
wait_for kfp-old 300 curl -sf "http://$CLUSTER_NODE_IP:$KFP_OLD_PORT/apis/v2beta1/healthz"
log "Kubeflow Pipelines $KFP_OLD_VERSION's API server ready in $((SECONDS - t0)) s (http://$CLUSTER_NODE_IP:$KFP_OLD_PORT)"
