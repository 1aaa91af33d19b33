//go:build tools

// Package tools pins the commands that scripts/build-tools.sh builds into bin/: the local control
// plane (kube-apiserver, kube-controller-manager, etcd), and a real node for the local control plane
// (make test-node): kubelet, and kube-scheduler which places pods on it.
// The blank imports keep `go mod tidy` from dropping the modules that provide them.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
