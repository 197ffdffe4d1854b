// Command pause is the process of every pod sandbox the cluster's containerd makes: it holds the
// pod's namespaces, reaps the orphans a shared PID namespace hands it, and exits on SIGINT or
// SIGTERM. The cluster has no registry to pull Kubernetes' own pause image from, so it is built
// here (cluster/build.sh) and packed into an image (cluster/images.sh).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
