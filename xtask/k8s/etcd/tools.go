//go:build tools

// etcd for the test control plane (built by `cargo xtask setup`; never part of Ferry itself).
package tools

import _ "go.etcd.io/etcd/server/v3"
