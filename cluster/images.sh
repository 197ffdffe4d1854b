#!/usr/bin/env bash
# The images the cluster runs that no registry can give here, each one binary built by
# cluster/build.sh in an image of its own: the pod sandbox (pause), CoreDNS, Argo's executor, and
# the JobSet and Trainer managers (installed as pods, by their own manifests: cluster/trainer.sh).
#   build:  podman builds each (FROM scratch) and saves it under the cache, once per version
#   import: the saved archives into the running cluster's containerd (namespace k8s.io)
#
# usage: cluster/images.sh build | import
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
	argoexec) echo "$(bin_dir argo)/argoexec /bin/argoexec 0" ;;
	# Their upstream images are distroless "nonroot" (uid 65532); their pods insist (runAsNonRoot).
	jobset) echo "$(bin_dir trainer)/jobset-manager /manager 65532" ;;
	trainer) echo "$(bin_dir trainer)/trainer-controller-manager /manager 65532" ;;
	esac
}

build() { # NAME
	local out ref dir bin inside user
	out=$(archive "$1")
	ref=$(image_ref "$1")
	[[ -f $out ]] && return 0
	command -v podman >/dev/null || die "podman is missing: apt-get install podman (make cluster-build does)"
	read -r bin inside user <<<"$(binary_of "$1")"
	[[ -x $bin ]] || die "no $bin: run make cluster-build"
	dir=$(mktemp -d)
	cp "$bin" "$dir/binary"
	printf 'FROM scratch\nCOPY binary %s\nWORKDIR /tmp\nUSER %s:%s\nENTRYPOINT ["%s"]\n' "$inside" "$user" "$user" "$inside" >"$dir/Containerfile"
	podman build -q -t "$ref" -f "$dir/Containerfile" "$dir" >/dev/null
	mkdir -p "$(dirname "$out")"
	podman save -q --format docker-archive -o "$out.tmp" "$ref"
	mv "$out.tmp" "$out"
	rm -rf "$dir"
	log "built $ref"
}

import() { # NAME
	in_cluster "$(bin_dir runtime)/ctr" --address "$CLUSTER_STATE/containerd/containerd.sock" -n k8s.io \
		images import "$(archive "$1")" >/dev/null
}

case ${1:-} in
build) for i in $CLUSTER_IMAGES; do build "$i"; done ;;
import) for i in $CLUSTER_IMAGES; do
	build "$i"
	import "$i"
done ;;
*) die "usage: cluster/images.sh build | import" ;;
esac
