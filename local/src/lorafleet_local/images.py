"""LoraFleet's container images, built on this machine from the project's own Dockerfiles.

`make images` (``python -m lorafleet_local.images build``) builds the operator and gateway images
and both trainer images with podman and tags them as the chart names them
(``ghcr.io/lorafleet/<name>:<appVersion>``), so a cluster whose runtime holds them runs the chart's
defaults unchanged.

No public image registry is reachable from these machines, so each Dockerfile's ``BASE_IMAGE`` is a
Python base made here: Debian bookworm from debootstrap (its Python is 3.11) with a virtualenv on
PATH, standing in for python:3.11-slim's writable ``pip``. Debian's mirror and PyPI are reachable
inside the builds (host network; the host's CA bundle is mounted for pip). PyTorch's CPU index is
not, so the trainer images get PyPI's torch (a CUDA build, which runs on the CPU as well) unless
TORCH_INDEX_URL names another index; both trainer images then share every layer up to their
environment, and the CUDA one costs seconds once the CPU one is built.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorafleet_local import checkout, debian

BASE = "localhost/lorafleet/python:3.11-bookworm"
# runc, not podman's default crun (which refuses this machine's hybrid cgroup layout), and explicit
# limits: without them setrlimit is refused inside the containers.
PODMAN = ("podman", "--runtime", "/usr/sbin/runc")
LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
PACKAGES = {"podman": "podman", "/usr/sbin/runc": "runc", "debootstrap": "debootstrap"}
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_IN_BUILD = "/etc/ssl/certs/host-ca.crt"


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: Path
    repository: str
    suffix: str = ""

    @property
    def tag(self) -> str:
        return f"{self.repository}:{app_version()}{self.suffix}"


IMAGES = {
    image.name: image
    for image in (
        Image("operator", checkout.ROOT / "operator" / "Dockerfile", "ghcr.io/lorafleet/operator"),
        Image("gateway", checkout.ROOT / "gateway" / "Dockerfile", "ghcr.io/lorafleet/gateway"),
        Image(
            "trainer-cpu", checkout.ROOT / "trainer" / "Dockerfile.cpu", "ghcr.io/lorafleet/trainer", "-cpu"
        ),
        Image("trainer-cuda", checkout.ROOT / "trainer" / "Dockerfile", "ghcr.io/lorafleet/trainer"),
    )
}


def app_version() -> str:
    text = (checkout.CHART / "Chart.yaml").read_text()
    found = re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no appVersion in {checkout.CHART / 'Chart.yaml'}")
    return found.group(1)


def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], check=check, capture_output=capture, text=True)


def exists(tag: str) -> bool:
    return shutil.which("podman") is not None and podman("image", "exists", tag, check=False).returncode == 0


def image_id(tag: str) -> str:
    """The image a tag names now, or "" when there is none."""
    if not exists(tag):
        return ""
    return podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


def size_bytes(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def workdir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorafleet" / "images"
    return Path(os.environ.get("LORAFLEET_IMAGES_DIR", default))


def build_base(work: Path) -> None:
    """Debian bookworm (debootstrap, minbase) with python3 and a virtualenv at /opt/python on PATH."""
    rootfs = work / "base-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    with open(work / "debootstrap.log", "w") as log:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    subprocess.run(["chroot", str(rootfs), "python3", "-m", "venv", "/opt/python"], check=True)
    for leftovers in (rootfs / "var/cache/apt/archives", rootfs / "var/lib/apt/lists"):
        for path in leftovers.glob("*"):
            if path.is_file():
                path.unlink()
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        subprocess.run(
            [
                *PODMAN,
                "import",
                "--change",
                "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                'CMD ["python3"]',
                "-",
                BASE,
            ],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
        )
    if tar.returncode != 0:
        raise RuntimeError(f"tar of {rootfs} failed")
    shutil.rmtree(rootfs)


def build(image: Image, work: Path) -> float:
    """Build one image from its Dockerfile; returns the seconds it took."""
    host_ca = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    torch_index = os.environ.get("TORCH_INDEX_URL", "https://pypi.org/simple")
    log = work / f"{image.name}.log"
    start = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(
            [
                *PODMAN,
                "build",
                "--network",
                "host",
                *LIMITS,
                "-v",
                f"{host_ca}:{HOST_CA_IN_BUILD}:ro",
                "--build-arg",
                f"PIP_CERT={HOST_CA_IN_BUILD}",
                "--build-arg",
                f"BASE_IMAGE={BASE}",
                "--build-arg",
                f"TORCH_INDEX_URL={torch_index}",
                "-f",
                str(image.dockerfile),
                "-t",
                image.tag,
                str(checkout.ROOT),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{tail}\nimages: {image.name} failed (log: {log})")
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorafleet_local.images", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build the images (all unless named)")
    build_cmd.add_argument("names", nargs="*", metavar="NAME", help=", ".join(IMAGES))
    sub.add_parser("list", help="the images' tags and sizes")
    args = parser.parse_args(argv)
    if args.command == "build":
        unknown = [name for name in args.names if name not in IMAGES]
        if unknown:
            parser.error(f"unknown image {', '.join(unknown)} (known: {', '.join(IMAGES)})")
        debian.install_missing(PACKAGES, "building the images")
        work = workdir()
        work.mkdir(parents=True, exist_ok=True)
        if not exists(BASE):
            print(f"images: making the base {BASE} (debootstrap bookworm)", flush=True)
            start = time.monotonic()
            build_base(work)
            print(f"images: {BASE} made in {time.monotonic() - start:.0f} s", flush=True)
        for name in args.names or list(IMAGES):
            image = IMAGES[name]
            before = image_id(image.tag)
            print(f"images: {image.tag} from {image.dockerfile.relative_to(checkout.ROOT)}", flush=True)
            print(f"images: {image.tag} built in {build(image, work):.0f} s", flush=True)
            if before and before != image_id(image.tag):
                # The tag moved: drop the image it named (podman refuses while a container or
                # another tag uses it), so rebuilds do not pile up gigabytes of untagged images.
                podman("image", "rm", before, check=False)
    for image in IMAGES.values():
        shown = f"{size_bytes(image.tag) / 1e6:,.0f} MB" if exists(image.tag) else "not built"
        print(f"{image.tag:40} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
