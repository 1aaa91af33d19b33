// Command monitoring_types strictly decodes the chart's monitoring.coreos.com/v1 objects into the
// Prometheus Operator's own Go API types: an unknown field or a value of the wrong type fails, as
// it would when the Prometheus Operator's CRDs validate them. It reads `helm template` output on
// stdin and prints one line per checked object.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

func target(kind string) any {
	switch kind {
	case "PodMonitor":
		return &monitoringv1.PodMonitor{}
	case "ServiceMonitor":
		return &monitoringv1.ServiceMonitor{}
	case "PrometheusRule":
		return &monitoringv1.PrometheusRule{}
	}
	return nil
}

func main() {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(os.Stdin))
	failed := false
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "reading input:", err)
			os.Exit(2)
		}
		var head header
		if err := yaml.Unmarshal(doc, &head); err != nil || head.APIVersion != "monitoring.coreos.com/v1" {
			continue
		}
		obj := target(head.Kind)
		if obj == nil {
			fmt.Fprintf(os.Stderr, "%s/%s: not a kind this check knows\n", head.Kind, head.Metadata.Name)
			failed = true
			continue
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			fmt.Fprintf(os.Stderr, "%s/%s: %v\n", head.Kind, head.Metadata.Name, err)
			failed = true
			continue
		}
		fmt.Printf("ok %s/%s\n", head.Kind, head.Metadata.Name)
	}
	if failed {
		os.Exit(1)
	}
}
