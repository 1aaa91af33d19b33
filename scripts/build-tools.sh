#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, kube-controller-manager, etcd) from the Go module
# pinned in tools/ into a bin/ directory (default: bin/ at the repository root).
#
# The versions live only in tools/go.mod. A stamp in bin/ records a hash of tools/go.mod, tools/go.sum
# and this script, so a second run with nothing changed is a no-op; a changed pin rebuilds. Go's own
# build cache (GOCACHE) makes a rebuild after a pin change cheap for the packages that did not move.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/bin}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"
tools="$root/tools"
binaries=(kube-apiserver kube-controller-manager etcd)
stamp="$bin/.tools.stamp"

if ! command -v go >/dev/null 2>&1; then
  echo "build-tools: Go is not installed (https://go.dev/dl/; the module asks for $(grep -m1 '^go ' "$tools/go.mod"))" >&2
  exit 1
fi

want="$(cat "$tools/go.mod" "$tools/go.sum" "$0" | sha256sum | cut -d' ' -f1)"
have_all=1
for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || have_all=0; done
if ((have_all)) && [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "build-tools: ${binaries[*]} up to date in $bin"
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

echo "build-tools: building kube-apiserver, kube-controller-manager $k8s_version and etcd" \
  "$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3) into $bin (a cold build takes a long time)"
start=$SECONDS
rm -f "$stamp"
# One go build for all three shares the common packages; CGO is off as in the upstream release builds.
CGO_ENABLED=0 nice -n 19 go build -trimpath -ldflags "$ldflags" -o "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  go.etcd.io/etcd/server/v3
# The etcd main package is its module's root; go names the binary "server" (the /v3 suffix is dropped).
mv -f "$bin/server" "$bin/etcd"
for b in "${binaries[@]}"; do "$bin/$b" --version >/dev/null; done
echo "$want" >"$stamp"
echo "build-tools: done in $((SECONDS - start)) s"
