"""A real node for the local control plane: a kubelet with containerd, runc and bridge networking.

Where the pod runner plays the kubelet with local processes (fast, for `make test`), this node runs
LoraFleet's pods as containers from the images `make images` builds, and the kubelet enforces their
probes, volume mounts, security contexts and resource limits. `make test-node` runs the e2e suite
on it (``Kube.start(node=True)``).

What it takes on these machines (each found by trying; see README "A real node"):
- kubelet v1.35 on cgroup v1 needs ``failCgroupV1: false``; cgroupfs, not systemd.
- root here lacks CAP_SYS_RESOURCE, so containerd may not lower a sandbox's oom_score_adj
  (``restrict_oom_score_adj``), and the kubelet's own rlimit change is refused (it logs and goes on).
- The kubelet refuses a loopback node IP, so the node is named ``localhost``: the API server dials
  a node by its Hostname address first, which makes logs, exec and port-forward work.
- No registry is reachable: images are imported into containerd from podman, and the sandbox
  ("pause") image is packed here from bin/pause (tools/pause).
- The API server listens on loopback only and there is no kube-proxy, so pods reach it at the
  ``kubernetes`` Service IP through one DNAT rule to 127.0.0.1 (``route_localnet`` on the bridge).
- Claims bind to volumes made here (hostPath PersistentVolumes under the node's directory).

Pods get addresses on a host-only bridge (``BRIDGE``, ``POD_SUBNET``): reachable from this machine,
routed nowhere else. The kubelet binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from lorafleet_local import checkout, control_plane, debian, images, pki, polling, processes

NODE_NAME = "localhost"
BRIDGE = "lorafleet0"
POD_SUBNET = "10.88.0.0/16"
NAT_CHAIN = "LORAFLEET-API"
PAUSE_IMAGE = "localhost/lorafleet/pause:local"
PACKAGES = {
    "containerd": "containerd",
    "/usr/sbin/runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "iptables": "iptables",
}
# Paths the kubelet, containerd and libcni use whatever they are told; removed on stop when the
# node made them.
HOST_PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/run/containerd", "/var/lib/cni")
VOLUMES = 8  # ready-made PersistentVolumes for claims
VOLUME_SIZE = "10Gi"


def cache_dir() -> Path:
    """containerd's image store, kept between runs: importing a 5 GB trainer image takes a minute."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lorafleet" / "node"


def images_to_run() -> list[str]:
    """The images a node for LoraFleet holds: the operator's, the gateway's and the CPU trainer's."""
    return [images.IMAGES["operator"].tag, images.IMAGES["gateway"].tag, images.IMAGES["trainer-cpu"].tag]


def helm_values() -> list[str]:
    """`helm install` values for a cluster on this node: its images, never pulled."""
    return [
        "operator.image.pullPolicy=Never",
        "gateway.image.pullPolicy=Never",
        f"operator.trainerImage={images.IMAGES['trainer-cpu'].tag}",
    ]


def start_for(plane: control_plane.ControlPlane, workdir: Path) -> Node:
    """A node registered with ``plane`` (started with ``node=True``), holding ``images_to_run()``."""
    port = int(plane.server.rsplit(":", 1)[1])
    return Node(workdir, plane.kubeconfig, port, plane.bin).start(images_to_run())


class Node:
    """containerd + kubelet registered as node ``localhost`` with the API server of ``kubeconfig``."""

    def __init__(self, workdir: Path, kubeconfig: Path, api_port: int, binaries: Path | None = None) -> None:
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.api_port = api_port
        self.bin = binaries or checkout.bin_dir()
        self.store = cache_dir() / "containerd"
        self.socket = workdir / "run" / "containerd.sock"
        self.children: list[processes.Child] = []
        self.made: list[str] = []  # HOST_PATHS this node created
        self.figures: dict[str, float] = {}

    # ---- start -------------------------------------------------------------------------------

    def start(self, tags: list[str], timeout: float = 120.0) -> Node:
        missing = checkout.missing_binaries(self.bin, ("kubelet", "pause", "kubectl"))
        if missing:
            raise RuntimeError(f"missing {', '.join(missing)} in {self.bin}: run `make tools kube-clients`")
        if os.geteuid() != 0:
            raise RuntimeError("a real node runs containers: it needs root")
        debian.install_missing(PACKAGES, "a real node")
        begin = time.monotonic()
        for sub in ("run", "logs", "etc/cni", "kubelet", "volumes"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        self.made = [p for p in HOST_PATHS if not os.path.exists(p)]
        try:
            self._write_configs()
            containerd = self._spawn(
                "containerd", ["containerd", "--config", str(self.workdir / "etc/containerd.toml")]
            )
            polling.eventually(
                "containerd", lambda: self._ctr("version").returncode == 0, timeout, 0.1, containerd
            )
            start = time.monotonic()
            self._import_pause()
            for tag in tags:
                self._import(tag)
            self.figures["images_import_s"] = time.monotonic() - start
            self._kubectl("delete", "node", NODE_NAME, "--ignore-not-found")
            kubelet = self._spawn("kubelet", self._kubelet_argv())
            polling.eventually(f"node {NODE_NAME} Ready", self._ready, timeout, 0.2, kubelet)
            self._pod_route_to_api()
            self._make_volumes()
        except BaseException:
            self.stop()
            raise
        self.figures["node_start_s"] = time.monotonic() - begin
        return self

    def _spawn(self, name: str, argv: list[str]) -> processes.Child:
        child = processes.Child(name, argv, self.workdir / "logs" / f"{name}.log")
        self.children.append(child)
        return child

    def _ctr(self, *args: str, stdin: Any = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            stdin=stdin,
            capture_output=True,
        )

    def _kubectl(self, *args: str, input: str | None = None) -> str:
        done = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def _ready(self) -> bool:
        node = json.loads(self._kubectl("get", "node", NODE_NAME, "-o", "json", "--ignore-not-found") or "{}")
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _write_configs(self) -> None:
        etc, run = self.workdir / "etc", self.workdir / "run"
        (etc / "containerd.toml").write_text(
            CONTAINERD_CONFIG.format(
                root=self.store,
                state=self.workdir / "containerd-state",
                socket=self.socket,
                runc_root=run / "runc",
                pause=PAUSE_IMAGE,
                cni_conf=etc / "cni",
                opt=self.workdir / "containerd-opt",
            )
        )
        network = {
            "cniVersion": "1.0.0",
            "name": "lorafleet",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (etc / "cni" / "10-lorafleet.conflist").write_text(json.dumps(network, indent=2))
        (etc / "kubelet.json").write_text(json.dumps(self._kubelet_config(), indent=2))

    def _kubelet_config(self) -> dict[str, Any]:
        endpoint = f"unix://{self.socket}"
        zero = "0%"
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # Loopback only: the API server reaches it there for logs, exec and port-forward.
            "address": "127.0.0.1",
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "containerRuntimeEndpoint": endpoint,
            "imageServiceEndpoint": endpoint,
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            # The API server has no kubelet client certificate; nothing but loopback reaches the port.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            # A shared disk that may be nearly full: never evict pods or collect images for disk.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": zero,
                "nodefs.inodesFree": zero,
                "imagefs.available": zero,
                "imagefs.inodesFree": zero,
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "serializeImagePulls": False,
            "resolvConf": "/etc/resolv.conf",
            "registerNode": True,
            "shutdownGracePeriod": "0s",
            "volumePluginDir": str(self.workdir / "kubelet-plugins"),
            "podLogsDir": str(self.workdir / "pod-logs"),
        }

    def _kubelet_argv(self) -> list[str]:
        return [
            str(self.bin / "kubelet"),
            f"--config={self.workdir / 'etc/kubelet.json'}",
            f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={self.workdir / 'kubelet'}",
            f"--cert-dir={self.workdir / 'kubelet/pki'}",
            f"--hostname-override={NODE_NAME}",
            "--v=1",
        ]

    # ---- images ------------------------------------------------------------------------------

    def _import(self, tag: str) -> None:
        """podman's image into containerd's store, unless the same image is there already."""
        image_id = images.image_id(tag)
        if not image_id:
            raise RuntimeError(f"{tag} is not built: run `make images`")
        stamp = self.store / "imported.json"
        seen: dict[str, str] = json.loads(stamp.read_text()) if stamp.exists() else {}
        if seen.get(tag) == image_id and self._ctr("images", "check", f"name=={tag}").returncode == 0:
            return
        save_argv = [*images.PODMAN, "save", "--format", "oci-archive", tag]
        with subprocess.Popen(save_argv, stdout=subprocess.PIPE) as save:
            done = self._ctr("images", "import", "-", stdin=save.stdout)
        if save.returncode != 0 or done.returncode != 0:
            raise RuntimeError(f"importing {tag} into containerd failed: {done.stderr.decode()[-2000:]}")
        seen[tag] = image_id
        stamp.write_text(json.dumps(seen, indent=2))

    def _import_pause(self) -> None:
        archive = self.workdir / "pause-oci.tar"
        pack_single_binary_image(self.bin / "pause", PAUSE_IMAGE, archive)
        done = self._ctr("images", "import", str(archive))
        if done.returncode != 0:
            raise RuntimeError(f"importing {PAUSE_IMAGE} failed: {done.stderr.decode()}")

    # ---- networking and volumes --------------------------------------------------------------

    def _pod_route_to_api(self) -> None:
        """Pods reach the loopback API server at the kubernetes Service IP (which its certificate
        names): DNAT from the bridge to 127.0.0.1, allowed by route_localnet on the bridge."""
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
            subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1")
        nat = ["iptables", "-t", "nat"]
        subprocess.run([*nat, "-N", NAT_CHAIN], capture_output=True)
        subprocess.run([*nat, "-F", NAT_CHAIN], check=True)
        subprocess.run(
            [*nat, "-A", NAT_CHAIN, "-d", f"{pki.KUBERNETES_SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
             "-j", "DNAT", "--to-destination", f"127.0.0.1:{self.api_port}"],
            check=True,
        )  # fmt: skip
        jump = ["PREROUTING", "-i", BRIDGE, "-j", NAT_CHAIN]
        if subprocess.run([*nat, "-C", *jump], capture_output=True).returncode != 0:
            subprocess.run([*nat, "-I", *jump[:1], "1", *jump[1:]], check=True)

    def _make_volumes(self) -> None:
        """Ready-made volumes for claims without a storage class (a local-path provisioner's job on kind)."""
        documents = []
        for index in range(VOLUMES):
            path = self.workdir / "volumes" / f"pv{index}"
            path.mkdir(exist_ok=True)
            path.chmod(0o777)  # any pod user writes, as on a fresh provisioned volume
            documents.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": f"local-pv{index}", "labels": {"lorafleet.io/local-node": "true"}},
                    "spec": {
                        "capacity": {"storage": VOLUME_SIZE},
                        "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "hostPath": {"path": str(path), "type": "Directory"},
                    },
                }
            )
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": documents})
        self._kubectl("apply", "-f", "-", input=manifest)

    # ---- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the kubelet, every pod container and containerd, and put the machine back: mounts,
        the bridge, iptables chains, cgroups and the host paths this node made."""
        kubelet = next((c for c in self.children if c.name == "kubelet"), None)
        if kubelet is not None:
            kubelet.stop(grace=5)  # first, so that it starts nothing again
        containerd = next((c for c in self.children if c.name == "containerd"), None)
        if containerd is not None and containerd.alive():
            tasks = self._ctr("tasks", "ls", "-q").stdout.decode().split()
            for task in tasks:
                self._ctr("tasks", "kill", "--signal", "SIGKILL", task)
        _kill_shims(self.socket)
        for child in self.children:
            child.stop(grace=5)
        self.children.clear()
        _unmount_under(self.workdir)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        _drop_chains()
        for top in Path("/sys/fs/cgroup").glob("*/kubepods"):
            _remove_cgroups(top)
        for top in Path("/sys/fs/cgroup").glob("*/k8s.io"):
            _remove_cgroups(top)
        for path in self.made:
            shutil.rmtree(path, ignore_errors=True)
        for result in Path("/var/lib/cni/results").glob("lorafleet-*"):
            result.unlink(missing_ok=True)


def pack_single_binary_image(binary: Path, name: str, archive: Path) -> None:
    """An OCI image archive (for ``ctr images import``) holding one static binary as /entrypoint."""
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        info = tar.gettarinfo(str(binary), arcname="entrypoint")
        info.uid = info.gid = 0
        info.mtime = 0
        with open(binary, "rb") as source:
            tar.addfile(info, source)
    raw = layer_tar.getvalue()
    layer = gzip.compress(raw, compresslevel=1, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/entrypoint"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(raw)]},
    }
    with tarfile.open(archive, "w") as out:
        layer_desc = _blob(out, layer, "application/vnd.oci.image.layer.v1.tar+gzip")
        config_desc = _blob(out, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }
        manifest_desc = _blob(
            out, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
        )
        manifest_desc["annotations"] = {"io.containerd.image.name": name}
        _member(out, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _member(out, "index.json", json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}).encode())


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _blob(tar: tarfile.TarFile, data: bytes, media_type: str) -> dict[str, Any]:
    digest = _digest(data)
    _member(tar, "blobs/sha256/" + digest.split(":", 1)[1], data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _kill_shims(socket: Path) -> None:
    """containerd's shims outlive it; this node's are the ones started with its socket."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), 9)


def _unmount_under(directory: Path) -> None:
    """Every mount under the node's directory (rootfs overlays, secrets, netns), deepest first."""
    prefix = str(directory.resolve()) + "/"
    for _ in range(3):
        mounts = [
            line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(prefix)
        ]  # fmt: skip
        if not mounts:
            return
        for mount in sorted(mounts, reverse=True):
            if subprocess.run(["umount", mount], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mount], capture_output=True)


def _drop_chains() -> None:
    """The iptables chains of the CNI plugins (CNI-*), the kubelet (KUBE-*) and ours, with the
    rules in built-in chains that jump to them."""
    ours = ("CNI-", "KUBE-", NAT_CHAIN)
    for table in ("nat", "filter", "mangle"):
        rules = subprocess.run(
            ["iptables-save", "-t", table], capture_output=True, text=True
        ).stdout.splitlines()
        chains = [line[1:].split()[0] for line in rules if line.startswith(":") and line[1:].startswith(ours)]
        for rule in rules:
            words = shlex.split(rule)  # comments are quoted and hold spaces
            if (
                rule.startswith("-A ")
                and not words[1].startswith(ours)
                and any(w.startswith(ours) for w in words)
            ):
                subprocess.run(["iptables", "-t", table, "-D", *words[1:]], capture_output=True)
        for flag in ("-F", "-X"):
            for chain in chains:
                subprocess.run(["iptables", "-t", table, flag, chain], capture_output=True)


def _remove_cgroups(top: Path) -> None:
    for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause}"
    enable_selinux = false
    disable_apparmor = true
    netns_mounts_under_state_dir = true
    # root here lacks CAP_SYS_RESOURCE: a sandbox may not get a lower oom_score_adj than ours.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "/usr/sbin/runc"
          SystemdCgroup = false
          Root = "{runc_root}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{cni_conf}"
      max_conf_num = 1
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
"""
