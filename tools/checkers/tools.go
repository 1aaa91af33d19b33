//go:build tools

// Package checkers pins the independent manifest checkers that scripts/build-checkers.sh builds into
// bin/: kubeconform (schema validation) and kube-score (workload best practices). They are a module
// of their own so that a checker pin never moves the control plane's large dependency graph.
package checkers

import (
	_ "github.com/yannh/kubeconform/cmd/kubeconform"
	_ "github.com/zegl/kube-score/cmd/kube-score"
)
