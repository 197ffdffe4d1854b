#!/usr/bin/env bash
# The images the cluster runs that no registry can give here, built from what cluster/build.sh
# built and from Debian's packages, and saved under the cache once per version:
#   - one binary FROM scratch: the pod sandbox (pause), CoreDNS, Argo's executor, the JobSet and
#     Trainer managers;
#   - root file systems from Debian's packages (mmdebstrap): a glibc base with a shell, nc and
#     Python (debian), and KFP's database (mariadb);
#   - on that base: KFP's API server (with its /config from the source), driver, launcher,
#     persistence agent and ScheduledWorkflow controller, the MLMD server (cluster/mlmd), and KFP's
#     UI (node, the frontend's server and client, from cluster/build.sh ui); KServe's storage
#     initializer (its Python package from the pinned source);
#   - the serving tier's servers FROM scratch: the Model Registry server and KServe's controller.
#   build:  podman builds each and saves it under the cache, once per version
#   import: the saved archives into the running cluster's containerd (namespace k8s.io)
#   share:  images of the control node's containerd onto the workers' (NODE_INDEX: one worker)
#
# usage: cluster/images.sh build | import [NAME ...]    (default: every image of the built tiers)
#        cluster/images.sh share [REF ...]              (default: every image the control node has)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster/lib.sh
. "$here/lib.sh"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/../docker/podman/containers.conf}

archive() { echo "$CLUSTER_CACHE/images/$(image_ref "$1" | tr '/:' '__').tar"; }

binary_of() { # NAME: the binary, where the image keeps it, and the user it runs as
	case $1 in
	pause) echo "$(bin_dir pause)/pause /pause 0" ;;
	coredns) echo "$(bin_dir runtime)/coredns /coredns 0" ;;
	# Upstream's argoexec image runs as uid 8737: KFP's pods (runAsNonRoot) insist.
	argoexec) echo "$(bin_dir argo)/argoexec /bin/argoexec 8737" ;;
	# Their upstream images are distroless "nonroot" (uid 65532); their pods insist (runAsNonRoot).
	jobset) echo "$(bin_dir trainer)/jobset-manager /manager 65532" ;;
	trainer) echo "$(bin_dir trainer)/trainer-controller-manager /manager 65532" ;;
	model-registry) echo "$(bin_dir registry)/model-registry /model-registry 65532" ;;
	kserve-controller) echo "$(bin_dir kserve)/manager /manager 65532" ;;
	esac
}

# NAME DIR: the Containerfile and context of an image built on the Debian base (its binaries in DIR).
on_debian() {
	local kfp base tree
	kfp=$(bin_dir kfp)
	base=$(image_ref debian)
	case $1 in
	kfp-api-server)
		tree=$(kfp_tree) # an assignment: a missing source stops here with its one line
		cp "$kfp/apiserver" "$2/apiserver"
		cp -r "$tree/backend/src/apiserver/config" "$2/config"
		# Upstream's image preloads sample pipelines; this one starts with none.
		echo '{"pipelines": [], "loadSamplesOnRestart": false}' >"$2/config/sample_config.json"
		cat <<-EOF
			FROM $base
			COPY apiserver /bin/apiserver
			COPY config /config
			ENV LOG_LEVEL=info TAG_NAME=$KFP_VERSION COMMIT_SHA=$KFP_COMMIT
			USER 1000
			EXPOSE 8888 8887
			CMD ["/bin/sh", "-c", "/bin/apiserver --config=/config --sampleconfig=/config/sample_config.json -logtostderr=true --logLevel=\${LOG_LEVEL}"]
		EOF
		;;
	kfp-driver | kfp-launcher)
		local b=${1#kfp-}
		[[ $b == launcher ]] && b=launcher-v2
		cp "$kfp/$b" "$2/$b"
		printf 'FROM %s\nCOPY %s /bin/%s\nUSER 65532\nENTRYPOINT ["/bin/%s"]\n' "$base" "$b" "$b" "$b"
		;;
	kfp-persistence-agent)
		cp "$kfp/persistence_agent" "$2/persistence_agent"
		cat <<-EOF
			FROM $base
			COPY persistence_agent /bin/persistence_agent
			ENV NAMESPACE="" TTL_SECONDS_AFTER_WORKFLOW_FINISH=86400 NUM_WORKERS=2 LOG_LEVEL=info EXECUTIONTYPE=Workflow
			USER 1000
			CMD ["/bin/sh", "-c", "persistence_agent --logtostderr=true --namespace=\${NAMESPACE} --ttlSecondsAfterWorkflowFinish=\${TTL_SECONDS_AFTER_WORKFLOW_FINISH} --numWorker \${NUM_WORKERS} --executionType \${EXECUTIONTYPE} --logLevel=\${LOG_LEVEL}"]
		EOF
		;;
	kfp-scheduledworkflow)
		# Its command line as the pinned release's own Dockerfile gives it (2.17 added flags 2.15 refuses).
		cp "$kfp/scheduledworkflow" "$2/controller"
		tree=$(kfp_tree)
		cat <<-EOF
			FROM $base
			COPY controller /bin/controller
			ENV NAMESPACE="" LOG_LEVEL=info
			USER 1000
			$(grep '^CMD' "$tree/backend/Dockerfile.scheduledworkflow")
		EOF
		;;
	kfp-ui)
		# Laid out as upstream's frontend/Dockerfile lays it out: the server in /server, the client
		# it serves in /client; node alone of the Node.js build (nothing installs at run time).
		local ui
		ui=$(bin_dir ui)
		[[ -f $ui/server/dist/server.js ]] || die "no KFP UI in $ui: run cluster/build.sh ui"
		cp "$ui/node/bin/node" "$2/node"
		cp -r "$ui/server" "$2/server"
		cp -r "$ui/client" "$2/client"
		cat <<-EOF
			FROM $base
			COPY node /usr/local/bin/node
			COPY server /server
			COPY client /client
			WORKDIR /server
			ENV API_SERVER_ADDRESS=http://localhost:3001
			USER 1000
			EXPOSE 3000
			CMD ["node", "dist/server.js", "../client/", "3000"]
		EOF
		;;
	mlmd)
		cp "$here/mlmd/server.py" "$2/server.py"
		# ml-metadata pins protobuf<5: a venv of its own. pip needs the machine's network and CA bundle.
		cat <<-EOF
			FROM $base
			RUN python3 -m venv /opt/mlmd && /opt/mlmd/bin/pip install -q --no-cache-dir ml-metadata==$ML_METADATA_VERSION
			COPY server.py /opt/mlmd/server.py
			USER 1000
			ENTRYPOINT ["/opt/mlmd/bin/python", "/opt/mlmd/server.py"]
		EOF
		;;
	kserve-storage-initializer)
		# As KServe's python/storage-initializer.Dockerfile builds it: its storage package and
		# entrypoint from the pinned source (pip needs the machine's network and CA bundle).
		# Before v0.16's python/storage, the storage code is the kserve package's, with its "storage"
		# extra (v0.15's Dockerfile installs python/kserve so): taken from the checkout's own objects.
		local tree package=storage
		tree=$(source_tree kserve)
		if [[ -d $tree/python/storage ]]; then
			cp -r "$tree/python/storage" "$2/storage"
		else
			package="storage[storage]"
			mkdir -p "$2/storage"
			git -C "$tree" archive HEAD python/kserve | tar -x -C "$2/storage" --strip-components=2
		fi
		cp -r "$tree/python/storage-initializer" "$2/storage-initializer"
		cat <<-EOF
			FROM $base
			COPY storage /opt/storage
			RUN python3 -m venv /prod_venv && /prod_venv/bin/pip install -q --no-cache-dir "/opt/$package" && rm -rf /opt/storage
			COPY storage-initializer /storage-initializer
			ENV VIRTUAL_ENV=/prod_venv PATH=/prod_venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
			RUN chmod 755 /storage-initializer/scripts/initializer-entrypoint && mkdir -p /work /mnt/models && chown 1000:1000 /work /mnt/models
			WORKDIR /work
			USER 1000
			ENTRYPOINT ["/storage-initializer/scripts/initializer-entrypoint"]
		EOF
		;;
	label-studio)
		# PyPI's label-studio in a venv of its own (k8s/label-studio's image; heartexlabs' where a registry is).
		cat <<-EOF
			FROM $base
			RUN python3 -m venv /opt/label-studio && /opt/label-studio/bin/pip install -q --no-cache-dir label-studio==$LABEL_STUDIO_VERSION
			ENV PATH=/opt/label-studio/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
			ENTRYPOINT ["label-studio"]
		EOF
		;;
	mariadb)
		cp "$here/kfp/mariadb-entrypoint.sh" "$2/entrypoint"
		printf 'FROM %s\nCOPY entrypoint /usr/local/bin/mariadb-entrypoint\nUSER 999:999\nENTRYPOINT ["/usr/local/bin/mariadb-entrypoint"]\nCMD ["/var/lib/mysql"]\n' \
			"$(image_ref mariadb-rootfs)"
		;;
	*) return 1 ;;
	esac
}

# Debian packages of a root file system image (mmdebstrap, minbase).
packages_of() {
	case $1 in
	debian) echo "ca-certificates,netcat-openbsd,python3,python3-venv" ;;
	mariadb-rootfs) echo "mariadb-server,netcat-openbsd" ;;
	esac
}

save() { # NAME
	local out
	out=$(archive "$1")
	mkdir -p "$(dirname "$out")"
	podman save -q --format docker-archive -o "$out.tmp" "$(image_ref "$1")"
	mv "$out.tmp" "$out"
	log "built $(image_ref "$1")"
}

rootfs() { # NAME
	local dir
	command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: apt-get install mmdebstrap (make cluster-build does)"
	dir=$(mktemp -d /var/tmp/imgpipe-cluster-rootfs.XXXXXX)
	# shellcheck disable=SC2016 # the hook's $1 is mmdebstrap's (the root being built)
	mmdebstrap --quiet --variant=minbase --include="$(packages_of "$1")" '--aptopt=APT::Install-Recommends "false"' \
		--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
		bookworm "$dir/rootfs.tar"
	podman import -q "$dir/rootfs.tar" "$(image_ref "$1")" >/dev/null
	rm -rf "$dir"
}

build() { # NAME
	local ref dir bin inside user
	ref=$(image_ref "$1")
	if [[ -f $(archive "$1") ]]; then
		# The archive is the cache; an image built on this one must also be in podman's store.
		podman image exists "$ref" || podman load -q -i "$(archive "$1")" >/dev/null
		return 0
	fi
	command -v podman >/dev/null || die "podman is missing: apt-get install podman (make cluster-build does)"
	if [[ -n $(packages_of "$1") ]]; then
		rootfs "$1"
		save "$1"
		return 0
	fi
	dir=$(mktemp -d /var/tmp/imgpipe-cluster-image.XXXXXX)
	if on_debian "$1" "$dir" >"$dir/Containerfile"; then
		if [[ $1 == mariadb ]]; then build mariadb-rootfs; else build debian; fi
		podman build -q --network host -v /etc/ssl/certs:/etc/ssl/certs:ro -t "$ref" -f "$dir/Containerfile" "$dir" >/dev/null
	else
		read -r bin inside user <<<"$(binary_of "$1")"
		[[ -x $bin ]] || die "no $bin: run make cluster-build"
		cp "$bin" "$dir/binary"
		printf 'FROM scratch\nCOPY binary %s\nWORKDIR /tmp\nUSER %s:%s\nENTRYPOINT ["%s"]\n' "$inside" "$user" "$user" "$inside" >"$dir/Containerfile"
		podman build -q -t "$ref" -f "$dir/Containerfile" "$dir" >/dev/null
	fi
	rm -rf "$dir"
	save "$1"
}

# Pinned: kubelet's image garbage collection, which disk pressure starts, never removes them
# (it did remove argoexec while a 6 GB step image was imported beside the cluster).
import() { # NAME
	in_cluster "$(bin_dir runtime)/ctr" --address "$(node_socket 0)" -n k8s.io \
		images import --label io.cri-containerd.pinned=pinned "$(archive "$1")" >/dev/null
}

# INDEX REF...: the control node's images REF on worker INDEX, as a registry would give each node
# its own: the blobs hard-linked (no second copy on disk), exported by one containerd and imported
# by the other only to be recorded (a blob the worker's store holds is not written again), each layer
# unpacked on the worker when a pod first needs it (containerd's CRI unpacks on create); the pod
# sandbox's unpacked at once.
share() {
	local index=$1 ref unpack
	shift
	local ctr src dst tar
	ctr=$(bin_dir runtime)/ctr
	src=$(node_state 0)/containerd/root/io.containerd.content.v1.content/blobs/sha256
	dst=$(node_state "$index")/containerd/root/io.containerd.content.v1.content/blobs/sha256
	mkdir -p "$dst"
	# A blob the control node's collector removes meanwhile was no image's (an image's are
	# referenced): it is skipped, as the import below writes whatever its image still lacks.
	find "$src" -maxdepth 1 -type f -printf '%f\n' | while read -r blob; do
		[[ -e $dst/$blob ]] || ln "$src/$blob" "$dst/$blob" 2>/dev/null || [[ ! -e $src/$blob ]] ||
			die "blob $blob: not linked into $(node_name "$index")'s store"
	done
	for ref; do
		"$ctr" --address "$(node_socket "$index")" -n k8s.io images ls -q "name==$ref" | grep -q . && continue # shared before
		unpack=(--no-unpack)
		[[ $ref == "$(image_ref pause)" ]] && unpack=()
		# Exported and imported by ctr itself (--local), through a file. Through containerd 2.2.9's
		# transfer service an export may close its file before the last blob is written ("file
		# already closed") and an import breaks off with a short read where it skips a blob the
		# store holds, which every hard-linked blob is. The file is removed at once; it is the state dir's.
		tar=$(mktemp "$CLUSTER_STATE/run/share.XXXXXX")
		if ! "$ctr" --address "$(node_socket 0)" -n k8s.io images export --local "$tar" "$ref" >/dev/null ||
			! "$ctr" --address "$(node_socket "$index")" -n k8s.io images import --local "${unpack[@]}" \
				--label io.cri-containerd.pinned=pinned "$tar" >/dev/null; then
			rm -f "$tar"
			die "$ref: not shared with $(node_name "$index")"
		fi
		rm -f "$tar"
	done
}

# The images of the tiers whose binaries are built (tier 3's only where KFP is).
wanted() {
	echo "$CLUSTER_IMAGES"
	[[ -x $(bin_dir kfp)/apiserver ]] && echo "$KFP_IMAGES"
	[[ -x $(bin_dir registry)/model-registry && -x $(bin_dir kserve)/manager ]] && echo "$SERVING_IMAGES"
	return 0
}

if [[ ${1:-} == share ]]; then # [REF...]: default every image the control node has; to NODE_INDEX, else every worker
	refs=("${@:2}")
	[[ ${#refs[@]} -gt 0 ]] || read -r -a refs <<<"$("$(bin_dir runtime)/ctr" --address "$(node_socket 0)" -n k8s.io images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
	for ((i = ${NODE_INDEX:-1}; i <= ${NODE_INDEX:-$((NODES - 1))}; i++)); do share "$i" "${refs[@]}"; done
	exit 0
fi
names=("${@:2}")
[[ ${#names[@]} -gt 0 ]] || read -r -a names <<<"$(wanted | tr '\n' ' ')"
case ${1:-} in
build) for i in "${names[@]}"; do build "$i"; done ;;
import) for i in "${names[@]}"; do
	build "$i"
	import "$i"
done ;;
*) die "usage: cluster/images.sh build | import [NAME ...] | share [REF ...]" ;;
esac
