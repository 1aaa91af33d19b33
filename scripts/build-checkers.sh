#!/usr/bin/env bash
# Builds the independent manifest checkers that `make test` runs into a bin/ directory (default:
# bin/ at the repository root): kubeconform and kube-score, pinned in tools/checkers/go.mod, and the
# Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule) of a pinned release, from
# which tests/chart/test_checkers.py makes kubeconform's schemas for the chart's monitoring objects.
#
# A module of its own (not tools/): a checker pin never moves the control plane's dependency graph,
# and this build takes a minute where the control plane takes many. A stamp records a hash of the
# pins and this script, so a second run with nothing changed is a no-op.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/bin}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"
module="$root/tools/checkers"
binaries=(kubeconform kube-score)
# The release whose CRDs describe the monitoring.coreos.com/v1 objects the chart renders.
prometheus_operator=github.com/prometheus-operator/prometheus-operator@v0.85.0
monitoring_crds=(servicemonitors podmonitors prometheusrules)
crd_dir="$bin/monitoring-crds"
stamp="$bin/.checkers.stamp"

if ! command -v go >/dev/null 2>&1; then
  echo "build-checkers: Go is not installed (https://go.dev/dl/; the module asks for $(grep -m1 '^go ' "$module/go.mod"))" >&2
  exit 1
fi

want="$(cat "$module/go.mod" "$module/go.sum" "$0" | sha256sum | cut -d' ' -f1)"
have_all=1
for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || have_all=0; done
for c in "${monitoring_crds[@]}"; do [[ -f "$crd_dir/monitoring.coreos.com_$c.yaml" ]] || have_all=0; done
if ((have_all)) && [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "build-checkers: ${binaries[*]} and the monitoring CRDs up to date in $bin"
  exit 0
fi

rm -f "$stamp"
cd "$module"
echo "build-checkers: building kubeconform $(go list -m -f '{{.Version}}' github.com/yannh/kubeconform)" \
  "and kube-score $(go list -m -f '{{.Version}}' github.com/zegl/kube-score) into $bin"
CGO_ENABLED=0 nice -n 19 go build -trimpath -ldflags "-s -w" -o "$bin/" \
  github.com/yannh/kubeconform/cmd/kubeconform \
  github.com/zegl/kube-score/cmd/kube-score
"$bin/kubeconform" -v >/dev/null
"$bin/kube-score" version >/dev/null

# go mod download checks the module against the checksum database, as a go.sum line would.
dir="$(go mod download -json "$prometheus_operator" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
mkdir -p "$crd_dir"
for c in "${monitoring_crds[@]}"; do
  cp -f "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$c.yaml" "$crd_dir/"
done
chmod -R u+w "$crd_dir"
echo "$want" >"$stamp"
echo "build-checkers: done"
