"""Debian packages that parts of the local cluster need (podman for the images, containerd and the
CNI plugins for a real node), installed with apt-get when missing."""

from __future__ import annotations

import os
import shutil
import subprocess


def install_missing(packages: dict[str, str], purpose: str) -> None:
    """``packages`` maps a command (or an absolute path) to the Debian package that provides it;
    the packages of those that are missing get installed, which needs root."""
    need = [
        pkg for tool, pkg in packages.items() if shutil.which(tool) is None and not os.access(tool, os.X_OK)
    ]
    if not need:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"{purpose} needs root to apt-get install {' '.join(need)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], check=True, env=env)
