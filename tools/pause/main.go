// Command pause is the process of a pod sandbox (the "infra" container) for the local node that
// make test-node runs. containerd's CRI plugin needs a sandbox image to hold each pod's namespaces,
// and no public registry is reachable from these machines to pull one from, so scripts/build-tools.sh
// builds this statically (no libc needed in the image) into bin/pause, to make that image locally.
//
// It does nothing but wait: SIGTERM or SIGINT ends it with status 0. As PID 1 of the pod's PID
// namespace it also inherits every orphaned process there, so on SIGCHLD it reaps all children
// that have exited, keeping zombies from piling up.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// Buffered so a signal that arrives while we are reaping is not dropped; SIGCHLDs that do get
	// coalesced are harmless because each reap pass collects every exited child.
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	reap() // children that exited before the handler was installed
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap collects every child that has already exited, without blocking on those still running.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 { // ECHILD: no children at all; 0: none has exited yet
			return
		}
	}
}
