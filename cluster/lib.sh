# shellcheck shell=bash disable=SC2034  # sourced: the names are used by the scripts that source it
# Shared by cluster/*.sh (sourced): the pinned versions, the cache and where each group's
# binaries live. The cache sits outside the repository and survives `make cluster-down`.
here=${here:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
# shellcheck source=cluster/versions.env
. "$here/versions.env"
CLUSTER_CACHE=${CLUSTER_CACHE:-/var/cache/imgpipe-cluster}

# The versions a group's binaries are built from: its cache key.
group_key() { # GROUP
	case $1 in
	control) echo "k8s$KUBERNETES_VERSION-etcd$ETCD_VERSION" ;;
	node) echo "k8s$KUBERNETES_VERSION" ;;
	runtime) echo "containerd$CONTAINERD_VERSION-coredns$COREDNS_VERSION" ;;
	argo) echo "argo$ARGO_VERSION" ;;
	kuberay) echo "kuberay$KUBERAY_VERSION" ;;
	trainer) echo "trainer$TRAINER_VERSION-jobset$JOBSET_VERSION" ;;
	kfp) echo "kfp$KFP_VERSION-${KFP_COMMIT:0:12}" ;;
	kfp-old) echo "kfp$KFP_OLD_VERSION-${KFP_OLD_COMMIT:0:12}" ;;
	ui) echo "kfp$KFP_VERSION-${KFP_COMMIT:0:12}-node$NODE_VERSION${NPM_VERSION:+-npm$NPM_VERSION}" ;;
	registry) echo "model-registry$MODEL_REGISTRY_VERSION-${MODEL_REGISTRY_COMMIT:0:12}" ;;
	kserve) echo "kserve$KSERVE_VERSION-${KSERVE_COMMIT:0:12}" ;;
	store) echo "seaweedfs$SEAWEEDFS_VERSION" ;;
	# Our own sandbox process: keyed by its source.
	pause) echo "src$(cat "$here/pause/main.go" "$here/pause/go.mod" | sha256sum | cut -c1-12)" ;;
	*) echo "unknown group: $1" >&2; return 1 ;;
	esac
}

bin_dir() { echo "$CLUSTER_CACHE/bin/$1-$(group_key "$1")"; }

# Every group a cluster runs (cluster/build.sh's), the order it builds them in.
CLUSTER_GROUPS="control node runtime pause argo kuberay trainer store kfp ui registry kserve"

# The stamp cluster/build.sh leaves once GROUP is built for its versions.
build_stamp() { echo "$CLUSTER_CACHE/stamps/$1-$(group_key "$1")"; }

# The groups of this release with no build in the cache, each as " group (its key)".
unbuilt_groups() {
	local group
	for group in $CLUSTER_GROUPS; do
		[[ -f $(build_stamp "$group") ]] || printf ' %s (%s)' "$group" "$(group_key "$group")"
	done
}

# The command that builds this release: the sources the Go module proxy refuses named by their variables.
build_command() {
	printf 'make cluster-build CLUSTER_RELEASE=%s KFP_SOURCE=<a clone of kubeflow/pipelines with tag %s> ' "$CLUSTER_RELEASE" "$KFP_VERSION"
	printf 'MODEL_REGISTRY_SOURCE=<kubeflow/model-registry, tag %s> KSERVE_SOURCE=<kserve/kserve, tag %s>' "$MODEL_REGISTRY_VERSION" "$KSERVE_VERSION"
}

# Upstream sources the Go module proxy refuses (kubeflow/pipelines, kubeflow/model-registry,
# kserve/kserve), each a checkout in the cache at its pinned commit, made by cluster/build.sh from
# the clone its variable names (KFP_SOURCE, MODEL_REGISTRY_SOURCE, KSERVE_SOURCE). Their
# manifests are taken from these checkouts too, never from the repository.
KFP_TREE=$CLUSTER_CACHE/src/kfp-$KFP_VERSION-${KFP_COMMIT:0:12}
KFP_OLD_TREE=$CLUSTER_CACHE/src/kfp-$KFP_OLD_VERSION-${KFP_OLD_COMMIT:0:12}
MODEL_REGISTRY_TREE=$CLUSTER_CACHE/src/model-registry-$MODEL_REGISTRY_VERSION-${MODEL_REGISTRY_COMMIT:0:12}
KSERVE_TREE=$CLUSTER_CACHE/src/kserve-$KSERVE_VERSION-${KSERVE_COMMIT:0:12}

# The source of a project: its variable's name, public repository, tag, commit and checkout, and
# the paths the build reads where it needs only those (KServe's tree also carries every release's
# generated install bundle, which a shallow or partial clone may lack).
source_of() { # kfp | kfp-old | model-registry | kserve
	case $1 in
	kfp) echo "KFP_SOURCE kubeflow/pipelines $KFP_VERSION $KFP_COMMIT $KFP_TREE" ;;
	kfp-old) echo "KFP_SOURCE kubeflow/pipelines $KFP_OLD_VERSION $KFP_OLD_COMMIT $KFP_OLD_TREE" ;;
	model-registry) echo "MODEL_REGISTRY_SOURCE kubeflow/model-registry $MODEL_REGISTRY_VERSION $MODEL_REGISTRY_COMMIT $MODEL_REGISTRY_TREE" ;;
	kserve) echo "KSERVE_SOURCE kserve/kserve $KSERVE_VERSION $KSERVE_COMMIT $KSERVE_TREE /go.mod /go.sum /LICENSE /cmd/ /pkg/ /config/ /python/storage/ /python/storage-initializer/" ;;
	*) die "no upstream source named $1" ;;
	esac
}

# Checks out the project's pinned commit from the clone its variable names into its tree; refuses
# a clone whose tag names another commit.
source_checkout() { # PROJECT
	local var repo version commit tree paths src tagged
	read -r var repo version commit tree paths <<<"$(source_of "$1")"
	src=${!var:-}
	[[ -n $src ]] || die "$var is not set: point it at a clone of the public $repo repository (one that has tag $version, commit $commit)"
	git -C "$src" rev-parse --git-dir >/dev/null 2>&1 || die "$var=$src is not a git repository"
	git -C "$src" cat-file -e "$commit^{commit}" 2>/dev/null || die "$var=$src has no commit $commit ($repo $version): fetch its tags"
	tagged=$(git -C "$src" rev-parse -q --verify "refs/tags/$version^{commit}" || true)
	[[ -z $tagged || $tagged == "$commit" ]] || die "$var=$src has tag $version at $tagged, not the pinned $commit: refusing it"
	if [[ ! -d $tree/.git ]]; then
		rm -rf "$tree"
		git clone -q --no-checkout "$src" "$tree"
	fi
	if [[ -n $paths ]]; then # only these paths (written before the checkout: no blob outside them is read)
		git -C "$tree" config core.sparseCheckout true
		git -C "$tree" config core.sparseCheckoutCone false
		tr ' ' '\n' <<<"$paths" >"$(git -C "$tree" rev-parse --absolute-git-dir)/info/sparse-checkout"
	fi
	git -C "$tree" -c advice.detachedHead=false checkout -q --force --detach "$commit"
	git -C "$tree" clean -qfdx
}

# The project's checked-out tree, or why there is none. A tree removed since its binaries were
# cached (the disk made room) is checked out again where its variable names the clone.
source_tree() { # PROJECT
	local var repo version commit tree paths
	read -r var repo version commit tree paths <<<"$(source_of "$1")"
	if [[ $(git -C "$tree" rev-parse HEAD 2>/dev/null) != "$commit" && -n ${!var:-} ]]; then
		source_checkout "$1" >&2
	fi
	[[ $(git -C "$tree" rev-parse HEAD 2>/dev/null) == "$commit" ]] || die "no $repo $version source in $tree: make cluster-build $var=<a clone of $repo>"
	echo "$tree"
}

kfp_checkout() { source_checkout kfp; }
kfp_tree() { source_tree kfp; }

NPM_REGISTRY=${NPM_REGISTRY:-https://registry.npmjs.org}

# PACKAGE VERSION DIR: a package of the npm registry unpacked into DIR, its tarball checked against
# the integrity (sha512) the registry's metadata gives for it.
npm_unpack() {
	local meta url want got tgz
	meta=$(curl -sSf "$NPM_REGISTRY/$1/$2") || die "the npm registry has no $1@$2"
	url=$(jq -r .dist.tarball <<<"$meta")
	want=$(jq -r .dist.integrity <<<"$meta")
	tgz=$(mktemp /var/tmp/imgpipe-cluster-npm.XXXXXX)
	curl -sSfL -o "$tgz" "$url"
	got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
	[[ $got == "$want" ]] || die "$1@$2: the tarball's $got is not the registry's $want"
	rm -rf "$3"
	mkdir -p "$3"
	tar -xzf "$tgz" -C "$3" --strip-components=1 --no-same-owner
	rm -f "$tgz"
}

# DIR NAME VERSION: DIR's package.json and package-lock.json without the dependency NAME@VERSION
# (the root's dependency on it and its node_modules entry); refused where another package of the
# lock needs NAME. For what the registry does not serve (npm's `fs` placeholder).
npm_drop() {
	local lock=$1/package-lock.json tmp
	jq -e --arg n "$2" --arg v "$3" '.packages["node_modules/" + $n].version == $v' "$lock" >/dev/null ||
		die "$lock has no $2@$3"
	jq -e --arg n "$2" '[.packages | to_entries[] | select(.key != "") | .value
		| (.dependencies, .optionalDependencies, .peerDependencies) // {} | has($n)] | any | not' "$lock" >/dev/null ||
		die "$lock: another package needs $2"
	# shellcheck disable=SC2016 # jq's $n
	local root='del(.dependencies[$n], .devDependencies[$n], .optionalDependencies[$n])'
	tmp=$(mktemp /var/tmp/imgpipe-cluster-npm.XXXXXX)
	jq --arg n "$2" "del(.packages[\"node_modules/\" + \$n]) | .packages[\"\"] |= $root" "$lock" >"$tmp"
	cat "$tmp" >"$lock"
	jq --arg n "$2" "$root" "$1/package.json" >"$tmp"
	cat "$tmp" >"$1/package.json"
	rm -f "$tmp"
}

# Go's module and build caches inside the cluster's cache; -mod=mod: our go.mod files are made
# in the cache and filled in as go resolves them.
go_env() {
	export GOMODCACHE="$CLUSTER_CACHE/gomod" GOCACHE="$CLUSTER_CACHE/gocache" GOFLAGS=-mod=mod GOTOOLCHAIN=local
	export GOPROXY="${GOPROXY:-https://proxy.golang.org}"
}

# MODULE VERSION: `go mod download -json`'s answer (the module's Dir, its GoMod file, ...),
# fetched through the proxy into the cache if it is not there yet.
module_info() { (go_env && cd "$CLUSTER_CACHE" && go mod download -json "$1@$2"); }

# MODULE VERSION: the module's folder in the cache (where the CRDs and manifests are taken from).
module_path() { module_info "$1" "$2" | jq -r .Dir; }

# The running cluster: its state (certificates, etcd's data, logs, pids) and its addresses, all
# inside the network namespace that `make cluster-up` makes (nothing is bound outside it).
CLUSTER_STATE=${CLUSTER_STATE:-/var/lib/imgpipe-cluster}
# The parent of every cgroup the cluster makes, in each cgroup v1 hierarchy; cluster-down removes it.
CLUSTER_CGROUP=imgpipe-cluster
CLUSTER_NODE_NAME=imgpipe-node
# Addresses exist only inside the cluster's namespace: its loopback interface carries the node's.
CLUSTER_NODE_IP=10.240.0.1
# Nodes in all: the control-plane node, and NODES-1 workers (cluster/worker.sh), each in a network
# namespace of its own behind a veth from the control node's. One fits 2 cores. While a cluster
# runs, the number it was brought up with (recorded in its state directory) wins over the variable.
NODES=$(cat "$CLUSTER_STATE/nodes" 2>/dev/null || echo "${NODES:-1}")
# The worker that carries a GPU node's labels and taint (the gpu overlay's nvidia.com/gpu), with a
# faked nvidia.com/gpu capacity of one: the scheduler places, nothing runs CUDA there.
CLUSTER_GPU_WORKER=2
CLUSTER_SERVICE_CIDR=10.96.0.0/16
CLUSTER_API_SERVICE_IP=10.96.0.1
CLUSTER_DNS_IP=10.96.0.10
CLUSTER_POD_CIDR=10.244.0.0/16
# The one node's share of it (the controller manager hands the first node the first /24).
CLUSTER_NODE_POD_CIDR=10.244.0.0/24
CLUSTER_DOMAIN=cluster.local
CLUSTER_API=https://127.0.0.1:6443
# kubelet writes these machine-wide sysctls (setupKernelTunables); inside the cluster's mount
# namespace each is a file of ours, so the machine's own stay as they are.
CLUSTER_MASKED_SYSCTLS="kernel/panic kernel/panic_on_oops vm/overcommit_memory vm/panic_on_oom kernel/keys/root_maxkeys kernel/keys/root_maxbytes"

# Debian's containernetworking-plugins.
CNI_BIN=/usr/lib/cni
# Images the cluster needs, built here from the binaries above (cluster/images.sh): no registry.
CLUSTER_IMAGES="pause coredns argoexec jobset trainer"
# The node-address port of tier 3's object store (behind seaweedfs.kubeflow:9000).
KFP_S3_PORT=19000
# The node-address HTTP port of Kubeflow v1.10.2's KFP API server (cluster/kfp-old.sh; gRPC one below; clear of weed's 18888).
KFP_OLD_PORT=17888
# Tier 3's (cluster/kfp.sh): KFP's backend, its database, MLMD and KFP's UI.
KFP_IMAGES="debian kfp-api-server kfp-driver kfp-launcher kfp-persistence-agent kfp-scheduledworkflow mlmd mariadb kfp-ui"
# Tier 5's (cluster/serving.sh): the Model Registry server, KServe's controller and its storage initializer.
SERVING_IMAGES="model-registry kserve-controller kserve-storage-initializer"

# NAME: a short hash of the files of ours an image is built from (its tag changes with them).
src_key() { cat "$@" | sha256sum | cut -c1-12; }

image_ref() { # NAME
	case $1 in
	pause) echo "localhost/imgpipe-cluster/pause:$(group_key pause)" ;;
	coredns) echo "localhost/imgpipe-cluster/coredns:$COREDNS_VERSION" ;;
	argoexec) echo "localhost/imgpipe-cluster/argoexec:$ARGO_VERSION-8737" ;;
	jobset) echo "localhost/imgpipe-cluster/jobset:$JOBSET_VERSION" ;;
	trainer) echo "localhost/imgpipe-cluster/trainer-controller-manager:$TRAINER_VERSION" ;;
	debian) echo "localhost/imgpipe-cluster/debian:bookworm" ;;
	mariadb-rootfs) echo "localhost/imgpipe-cluster/mariadb-rootfs:$MARIADB_VERSION" ;;
	mariadb) echo "localhost/imgpipe-cluster/mariadb:$MARIADB_VERSION-$(src_key "$here/kfp/mariadb-entrypoint.sh")" ;;
	mlmd) echo "localhost/imgpipe-cluster/mlmd-server:$ML_METADATA_VERSION-$(src_key "$here/mlmd/server.py")" ;;
	kfp-ui) echo "localhost/imgpipe-cluster/kfp-ui:$KFP_VERSION-node$NODE_VERSION" ;;
	kfp-*) echo "localhost/imgpipe-cluster/$1:$KFP_VERSION" ;;
	model-registry) echo "localhost/imgpipe-cluster/model-registry:$MODEL_REGISTRY_VERSION" ;;
	kserve-*) echo "localhost/imgpipe-cluster/$1:$KSERVE_VERSION" ;;
	label-studio) echo "localhost/imgpipe-cluster/label-studio:$LABEL_STUDIO_VERSION" ;;
	*) echo "unknown image: $1" >&2; return 1 ;;
	esac
}

holder_pid() { cat "$CLUSTER_STATE/run/holder.pid" 2>/dev/null; }

# Node INDEX: 0 is the control-plane node (the namespace holder's), 1.. the workers.
node_name() { if (($1 == 0)); then echo "$CLUSTER_NODE_NAME"; else echo "imgpipe-worker-$1"; fi; }
node_ip() { echo "10.240.0.$(($1 + 1))"; }
# The process whose network namespace is the node's (a worker's shares the holder's mounts).
node_pid() { if (($1 == 0)); then holder_pid; else cat "$CLUSTER_STATE/run/worker-$1.pid" 2>/dev/null; fi; }
# A node's own files: the control node's at the state directory's top, as before workers.
node_state() { if (($1 == 0)); then echo "$CLUSTER_STATE"; else echo "$CLUSTER_STATE/workers/$(node_name "$1")"; fi; }
# Its daemons' names in run/ and log/: containerd, kubelet, kube-proxy; a worker's with its suffix.
node_daemon() { if (($2 == 0)); then echo "$1"; else echo "$1-worker-$2"; fi; } # DAEMON INDEX
node_socket() { echo "$(node_state "$1")/containerd/containerd.sock"; }
# The control node's end of the veth to worker INDEX.
worker_link() { echo "imgw$1"; }
# Runs a command in node INDEX's network namespace (and the cluster's mounts).
in_node() { # INDEX CMD...
	local pid
	pid=$(node_pid "$1")
	shift
	nsenter -t "$pid" -n -m --wd="$PWD" -- "$@"
}

# Is the namespace holder alive (and ours: its command line names the state dir's marker)?
cluster_running() {
	local pid
	pid=$(holder_pid) || return 1
	[[ -n $pid && -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "imgpipe-cluster-holder"
}

# Runs a command inside the cluster's network and mount namespaces.
in_cluster() { nsenter -t "$(holder_pid)" -n -m --wd="$PWD" -- "$@"; }

# The cluster's cgroup parent in every hierarchy, cgroup v2's "unified" one included (runc and
# kubelet make their cgroups there too on a hybrid host).
cluster_cgroup_dirs() {
	local d
	for d in /sys/fs/cgroup/*/"$CLUSTER_CGROUP"; do
		[[ -d $d ]] && echo "$d"
	done
	return 0
}

cgroup_controllers() {
	local c
	for c in /sys/fs/cgroup/*/; do
		c=$(basename "$c")
		[[ $c == unified ]] && continue
		[[ -f /sys/fs/cgroup/$c/cgroup.procs ]] && echo "$c"
	done
}

log() { printf '%s %s: %s\n' "$(date +%H:%M:%S)" "$(basename "$0" .sh)" "$*" >&2; }
die() {
	log "$*"
	exit 1
}

# NAME CMD...: a daemon in the namespace and in the cluster's cgroup; its pid in run/NAME.pid.
start_daemon() { start_daemon_on 0 "$@"; }

# INDEX NAME CMD...: the same in node INDEX's network namespace.
start_daemon_on() {
	local pid name=$2
	pid=$(node_pid "$1")
	shift 2
	# shellcheck disable=SC2016 # expanded by the inner bash
	setsid nsenter -t "$pid" -n -m -- bash -c '
		for c in $1; do echo $$ >"/sys/fs/cgroup/$c/$2/control/cgroup.procs"; done
		echo $$ >"$3"
		shift 3
		exec "$@"' _ "$(cgroup_controllers | tr '\n' ' ')" "$CLUSTER_CGROUP" "$CLUSTER_STATE/run/$name.pid" "$@" \
		</dev/null >>"$CLUSTER_STATE/log/$name.log" 2>&1 &
}

# NAME SECONDS CMD...: until CMD succeeds inside the namespace, or say which daemon's log to read.
wait_for() {
	local name=$1 seconds=$2 i
	shift 2
	for i in $(seq $((seconds * 5))); do
		in_cluster "$@" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	tail -n 20 "$CLUSTER_STATE/log/$name.log" >&2 || true
	die "$name is not ready after $seconds s (log: $CLUSTER_STATE/log/$name.log)"
}

kubeconfig() { # NAME CERT [SERVER [FILE]]: FILE (default $CLUSTER_STATE/NAME.kubeconfig) as NAME with CERT's key
	local kc=${4:-$CLUSTER_STATE/$1.kubeconfig} k PKI=$CLUSTER_STATE/pki
	k=$(bin_dir control)/kubectl
	$k config set-cluster imgpipe --server="${3:-$CLUSTER_API}" --certificate-authority="$PKI/ca.crt" --embed-certs --kubeconfig="$kc" >/dev/null
	$k config set-credentials "$1" --client-certificate="$PKI/$2.crt" --client-key="$PKI/$2.key" --embed-certs --kubeconfig="$kc" >/dev/null
	$k config set-context default --cluster=imgpipe --user="$1" --kubeconfig="$kc" >/dev/null
	$k config use-context default --kubeconfig="$kc" >/dev/null
	chmod 600 "$kc"
}


# kubectl as the cluster's admin, inside its namespace.
kubectl_admin() { in_cluster "$(bin_dir control)/kubectl" --kubeconfig="$CLUSTER_STATE/admin.kubeconfig" "$@"; }
