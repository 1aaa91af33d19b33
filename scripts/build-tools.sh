#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, kube-controller-manager, etcd), and a real node for
# the local control plane (make test-node): kubelet, and kube-scheduler which places pods on it, from
# the Go module pinned in tools/ into a bin/ directory (default: bin/ at the repository root). It also
# builds pause (tools/pause), the static process of the node's pod sandboxes.
#
# The versions live only in tools/go.mod. A stamp in bin/ records a hash of tools/go.mod, tools/go.sum,
# pause's source and this script, so a second run with nothing changed is a no-op; a changed pin
# rebuilds. Go's own build cache (GOCACHE) makes a rebuild after a pin change cheap for the packages
# that did not move.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/bin}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"
tools="$root/tools"
binaries=(kube-apiserver kube-controller-manager etcd kubelet kube-scheduler)   # all answer --version
stamp="$bin/.tools.stamp"

if ! command -v go >/dev/null 2>&1; then
  echo "build-tools: Go is not installed (https://go.dev/dl/; the module asks for $(grep -m1 '^go ' "$tools/go.mod"))" >&2
  exit 1
fi

want="$(cat "$tools/go.mod" "$tools/go.sum" "$tools"/pause/*.go "$0" | sha256sum | cut -d' ' -f1)"
have_all=1
for b in "${binaries[@]}" pause; do [[ -x "$bin/$b" ]] || have_all=0; done
if ((have_all)) && [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "build-tools: ${binaries[*]} pause up to date in $bin"
  exit 0
fi

cd "$tools"
k8s_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"   # e.g. v1.35.4
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
# Without these the API server reports v0.0.0-master, and kubectl/helm version checks misfire.
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=$major -X $vpkg.gitMinor=$minor"
ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"

echo "build-tools: building kube-apiserver, kube-controller-manager, kubelet, kube-scheduler" \
  "$k8s_version, etcd $(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3) and pause into $bin" \
  "(a cold build takes a long time)"
start=$SECONDS
rm -f "$stamp"
# One go build for all five shares the common packages; CGO is off as in the upstream release builds.
CGO_ENABLED=0 nice -n 19 go build -trimpath -ldflags "$ldflags" -o "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-scheduler \
  go.etcd.io/etcd/server/v3
# The etcd main package is its module's root; go names the binary "server" (the /v3 suffix is dropped).
mv -f "$bin/server" "$bin/etcd"
# pause goes into a sandbox image with nothing else in it, so it must stay static: CGO off, always.
CGO_ENABLED=0 nice -n 19 go build -trimpath -ldflags "-s -w" -o "$bin/pause" ./pause
for b in "${binaries[@]}"; do "$bin/$b" --version >/dev/null; done   # not pause: it would block
echo "$want" >"$stamp"
echo "build-tools: done in $((SECONDS - start)) s"
