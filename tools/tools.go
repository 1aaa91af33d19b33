//go:build tools

// Package tools pins the control-plane commands that scripts/build-tools.sh builds into bin/.
// The blank imports keep `go mod tidy` from dropping the modules that provide them.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
