"""The real node's pure parts: the sandbox image it packs, the kubelet settings it relies on, and the
image tags `make images` gives (the node itself runs in `make test-node`)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import yaml

from lorafleet_local import checkout, images, node


def test_the_pause_image_is_an_oci_archive_ctr_can_name(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really")
    binary.chmod(0o755)
    archive = tmp_path / "pause.tar"
    node.pack_single_binary_image(binary, node.PAUSE_IMAGE, archive)
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    # Every blob is stored under its own digest.
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == node.PAUSE_IMAGE
    manifest = json.loads(files["blobs/" + entry["digest"].replace(":", "/")])
    config = json.loads(files["blobs/" + manifest["config"]["digest"].replace(":", "/")])
    assert config["config"]["Entrypoint"] == ["/entrypoint"]
    (layer,) = manifest["layers"]
    assert layer["size"] == len(files["blobs/" + layer["digest"].replace(":", "/")])


def test_the_kubelet_keeps_to_loopback_and_runs_on_cgroup_v1(tmp_path: Path) -> None:
    config = node.Node(tmp_path, tmp_path / "kubeconfig", 6443)._kubelet_config()
    assert config["address"] == config["healthzBindAddress"] == "127.0.0.1"
    assert config["readOnlyPort"] == 0
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs"
    assert config["containerRuntimeEndpoint"] == f"unix://{tmp_path / 'run' / 'containerd.sock'}"


def test_image_tags_are_the_charts_defaults() -> None:
    chart = yaml.safe_load((checkout.CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((checkout.CHART / "values.yaml").read_text())
    assert images.app_version() == chart["appVersion"]
    operator = values["operator"]["image"]["repository"]
    assert images.IMAGES["operator"].tag == f"{operator}:{chart['appVersion']}"
    # The operator's default trainer image (settings.py) is the CUDA one; the CPU one is -cpu.
    assert images.IMAGES["trainer-cuda"].tag == f"ghcr.io/lorafleet/trainer:{chart['appVersion']}"
    assert images.IMAGES["trainer-cpu"].tag == images.IMAGES["trainer-cuda"].tag + "-cpu"
