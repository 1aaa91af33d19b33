"""LoraFleet on one machine: a real Kubernetes control plane on loopback that runs LoraFleet's pods.

`lorafleet-local up` starts etcd, kube-apiserver and kube-controller-manager (control_plane, with a
fresh PKI and kubeconfigs) and a pod runner that plays the kubelet for LoraFleet's own pods, each a
local process on its own 127.X.Y.Z address (pod_runner, pod_specs); `lorafleet-local demo` installs
the chart on it and trains adapters end to end (demo). The tests use the same pieces. It runs the
operator and the trainers as processes and imports neither.
"""
