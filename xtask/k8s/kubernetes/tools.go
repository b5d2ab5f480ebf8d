//go:build tools

// The upstream Kubernetes binaries Ferry's tests, lab and benchmarks run (built by
// `cargo xtask setup`; never part of Ferry itself).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
