#!/usr/bin/env bash
# The e2e tests on a kind cluster: for machines with Docker (CI runners, laptops). It cannot run
# where there is no Docker engine; there, `make test-e2e` runs the same tests on the local control
# plane instead. Steps: install kind (pinned below), create the cluster from tests/e2e/kind.yaml,
# build the CPU trainer and operator images and load them into the node, then run the e2e tests
# with KUBECONFIG pointing at the cluster; the tests install the chart with those images.
#
#   KIND_NODE_IMAGE   node image (default: the one this kind release pins)
#   KEEP_CLUSTER=1    leave the cluster running afterwards
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/bin"
kind_version=v0.33.0
cluster=lorafleet-e2e
tag=e2e
work="$(mktemp -d -t lorafleet-kind-XXXXXX)"

die() { echo "e2e-kind: $*" >&2; exit 1; }
command -v docker >/dev/null 2>&1 || die "needs Docker (no docker command here); use 'make test-e2e' for the local control plane"
docker info >/dev/null 2>&1 || die "Docker is installed but its engine does not answer (is the daemon running?)"

mkdir -p "$bin"
have="$("$bin/kind" version -q 2>/dev/null || true)"
if [[ "${have#v}" != "${kind_version#v}" ]]; then
  command -v go >/dev/null 2>&1 || die "Go is needed to install kind $kind_version"
  echo "e2e-kind: installing kind $kind_version into $bin"
  GOBIN="$bin" go install "sigs.k8s.io/kind@$kind_version"
fi
make -C "$root" --no-print-directory kube-clients
export PATH="$bin:$PATH"

image_args=()
[[ -n "${KIND_NODE_IMAGE:-}" ]] && image_args=(--image "$KIND_NODE_IMAGE")
kubeconfig="$work/kubeconfig"
cleanup() {
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    rm -rf "$work"
  else
    echo "e2e-kind: cluster $cluster kept; KUBECONFIG=$kubeconfig"
  fi
}
trap cleanup EXIT
kind create cluster --name "$cluster" --config "$root/tests/e2e/kind.yaml" --kubeconfig "$kubeconfig" \
  --wait 120s "${image_args[@]}"

docker build -f "$root/trainer/Dockerfile.cpu" -t "lorafleet/trainer:$tag" "$root"
docker build -f "$root/operator/Dockerfile" -t "lorafleet/operator:$tag" "$root"
kind load docker-image --name "$cluster" "lorafleet/trainer:$tag" "lorafleet/operator:$tag"

# Read by local/src/lorafleet_local/fleet.py: every `helm install` in the tests uses the images just loaded.
export LORAFLEET_E2E_HELM_SET="operator.image.repository=lorafleet/operator,operator.image.tag=$tag,operator.image.pullPolicy=Never,operator.trainerImage=lorafleet/trainer:$tag"
KUBECONFIG="$kubeconfig" "$root/.venv/bin/python" -m pytest -m e2e "$root/tests/local" "$root/tests/e2e"
