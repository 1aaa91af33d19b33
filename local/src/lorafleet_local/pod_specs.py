"""Turn a Pod object into a local process plan: the kubelet's job, minus containers.

Pure functions on plain dicts (the API's camelCase JSON). A pod's program is chosen by what it is
(trainer pods carry the `lorafleet.io/pool` label; the operator's container runs
`lorafleet-operator`), its command and args are kept, listen-on-all addresses become the pod's own
loopback address, volume mount paths are mapped to local directories, and `env` is resolved the
way the kubelet would (values, field refs, Secret and ConfigMap keys).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POOL_LABEL = "lorafleet.io/pool"
TRAINER = "lorafleet-trainer"
OPERATOR = "lorafleet-operator"
GATEWAY = "lorafleet-gateway"
VLLM = "vllm"  # a pod of a vLLM image: vLLM's OpenAI server, from its own virtualenv
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# Models a vLLM pod may name by hub id, which this machine cannot download: the runner serves the
# builtin that is the same model (builtin:smollm2 is converted from SmolLM2-135M-Instruct's weights).
OFFLINE_MODELS = {"HuggingFaceTB/SmolLM2-135M-Instruct": "builtin:smollm2"}
ANY_ADDRESS = ("0.0.0.0", "::", "[::]")
# Host variables a container would not see but a local Python process needs to find its caches.
# OMP_WAIT_POLICY: processes that share this machine's cores set it PASSIVE (`make test` does), so
# a pod's OpenMP threads sleep instead of spinning while they wait for a core another process holds.
PASSTHROUGH_ENV = (
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "TORCH_HOME",
    "OMP_WAIT_POLICY",
)

Pod = Mapping[str, Any]
# (kind, namespace, name) -> the object's decoded `data` (Secret values already base64-decoded).
Lookup = Callable[[str, str, str], Mapping[str, str]]


class PodSpecError(ValueError):
    """The pod asks for something the local runner cannot provide; the message names the field."""


@dataclass
class Volume:
    """A volume mount path and the local directory that stands in for it."""

    mount_path: str
    local: Path
    source: str  # secret | configMap | persistentVolumeClaim | emptyDir | other
    source_name: str = ""
    items: list[Mapping[str, str]] = field(default_factory=list)
    optional: bool = False  # a Secret or ConfigMap (or a key of it) that may be missing


@dataclass
class LocalPlan:
    """Everything needed to run one pod as a local process."""

    program: str
    argv: list[str]
    env: dict[str, str]
    volumes: list[Volume]
    readiness: tuple[str, int] | None  # (path, port) of an httpGet readiness probe
    container: str


def _is_vllm(container: Mapping[str, Any]) -> bool:
    """An image of vLLM's (vllm/vllm-openai, a vllm-cpu build), or a command that runs its server."""
    repository = str(container.get("image", "")).split("@")[0].rsplit(":", 1)[0]
    words = [*(container.get("command") or []), *(container.get("args") or [])]
    return os.path.basename(repository).startswith("vllm") or VLLM_MODULE in words[:3]


def program_of(pod: Pod) -> str | None:
    """Which program runs this pod (LoraFleet's or vLLM), or None for pods the runner leaves alone."""
    if POOL_LABEL in (pod["metadata"].get("labels") or {}):
        return TRAINER
    for container in pod["spec"].get("containers", []):
        words = [*(container.get("command") or []), *(container.get("args") or [])]
        for program in (OPERATOR, GATEWAY):
            if any(os.path.basename(w) == program for w in words[:2]):
                return program
        if _is_vllm(container):
            return VLLM
    return None


def _main_container(pod: Pod, program: str) -> Mapping[str, Any]:
    containers = pod["spec"].get("containers") or []
    if not containers:
        raise PodSpecError("spec.containers is empty")
    for container in containers:
        container = dict(container)
        words = [*(container.get("command") or []), *(container.get("args") or [])]
        if any(os.path.basename(w) == program for w in words[:2]):
            return container
        if program == VLLM and _is_vllm(container):
            return container
    first: Mapping[str, Any] = containers[0]
    return first


def _volumes(pod: Pod, container: Mapping[str, Any], pod_dir: Path, claims_dir: Path) -> list[Volume]:
    by_name = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    result = []
    for mount in container.get("volumeMounts") or []:
        volume = by_name.get(mount["name"])
        if volume is None:
            raise PodSpecError(f"volumeMounts[{mount['name']}]: no volume of that name in spec.volumes")
        optional = False
        if "secret" in volume:
            local, source = pod_dir / "volumes" / mount["name"], "secret"
            source_name, items = volume["secret"]["secretName"], volume["secret"].get("items") or []
            optional = bool(volume["secret"].get("optional"))
        elif "configMap" in volume:
            local, source = pod_dir / "volumes" / mount["name"], "configMap"
            source_name, items = volume["configMap"]["name"], volume["configMap"].get("items") or []
            optional = bool(volume["configMap"].get("optional"))
        elif "persistentVolumeClaim" in volume:
            # One directory per claim, shared by every pod that mounts it, like a ReadWriteMany volume.
            claim = volume["persistentVolumeClaim"]["claimName"]
            local, source, source_name, items = claims_dir / claim, "persistentVolumeClaim", claim, []
        else:
            source = "emptyDir" if "emptyDir" in volume else "other"
            local, source_name, items = pod_dir / "volumes" / mount["name"], "", []
        if mount.get("subPath"):
            local = local / mount["subPath"]
        mount_path = mount["mountPath"].rstrip("/") or "/"
        result.append(Volume(mount_path, local, source, source_name, items, optional))
    # Longest mount path first, so /data/cache maps before /data.
    return sorted(result, key=lambda v: len(v.mount_path), reverse=True)


def map_path(value: str, volumes: list[Volume]) -> str:
    """Rewrite a container path (or `--flag=path`) under a mount to the local directory."""
    if value.startswith("-") and "=" in value:
        flag, rest = value.split("=", 1)
        return f"{flag}={map_path(rest, volumes)}"
    for volume in volumes:
        if value == volume.mount_path or value.startswith(volume.mount_path + "/"):
            return str(volume.local) + value[len(volume.mount_path) :]
    return value


def _localize(value: str, volumes: list[Volume], ip: str) -> str:
    if value in ANY_ADDRESS:
        return ip
    if value.startswith("-") and "=" in value and value.split("=", 1)[1] in ANY_ADDRESS:
        return value.split("=", 1)[0] + "=" + ip
    return map_path(value, volumes)


def _field_ref(pod: Pod, path: str, ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or "localhost",
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": ip,
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return str((meta.get(source) or {}).get(path[len(prefix) + 2 : -2], ""))
    raise PodSpecError(f"env valueFrom.fieldRef.fieldPath {path!r} is not supported by the local runner")


def _env(pod: Pod, container: Mapping[str, Any], ip: str, lookup: Lookup) -> dict[str, str]:
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
            if key in source:
                data = lookup(kind, namespace, source[key]["name"])
                env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        if "value" in item or "valueFrom" not in item:
            env[item["name"]] = str(item.get("value", ""))
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = _field_ref(pod, ref["fieldRef"]["fieldPath"], ip)
        elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
            kind, key = (
                ("Secret", "secretKeyRef") if "secretKeyRef" in ref else ("ConfigMap", "configMapKeyRef")
            )
            data = lookup(kind, namespace, ref[key]["name"])
            if ref[key]["key"] not in data and not ref[key].get("optional"):
                raise PodSpecError(
                    f"env {item['name']}: {kind} {ref[key]['name']} has no key {ref[key]['key']!r}"
                )
            env[item["name"]] = data.get(ref[key]["key"], "")
        elif "resourceFieldRef" in ref:
            env[item["name"]] = _resource_field_ref(container, ref["resourceFieldRef"])
        else:
            raise PodSpecError(
                f"env {item['name']}: valueFrom {sorted(ref)} is not supported by the local runner"
            )
    return env


_SUFFIXES = {
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def _quantity(text: str) -> float:
    number = text.rstrip("".join({c for suffix in _SUFFIXES for c in suffix}))
    suffix = text[len(number) :]
    if suffix not in _SUFFIXES or not number:
        raise PodSpecError(f"quantity {text!r} is not supported by the local runner")
    return float(number) * _SUFFIXES[suffix]


def _resource_field_ref(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """What the kubelet puts there: the container's request or limit, in units of ``divisor``
    rounded up; where the container sets none, this machine's capacity stands for the node's."""
    kind, _, resource = str(ref["resource"]).partition(".")
    value = (container.get("resources") or {}).get(kind, {}).get(resource)
    if value is not None:
        amount = _quantity(str(value))
    elif resource == "cpu":
        amount = float(os.cpu_count() or 1)
    elif resource == "memory":
        amount = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    else:
        raise PodSpecError(f"resourceFieldRef {ref['resource']!r} is not supported by the local runner")
    divisor = _quantity(str(ref.get("divisor", "1")))
    return str(max(1, -int(-amount // divisor)) if amount else 0)


def _readiness(container: Mapping[str, Any]) -> tuple[str, int] | None:
    http_get = (container.get("readinessProbe") or {}).get("httpGet")
    if not http_get:
        return None
    port = http_get["port"]
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if port not in named:
            raise PodSpecError(f"readinessProbe.httpGet.port {port!r} names no container port")
        port = named[port]
    return str(http_get.get("path", "/")), int(port)


def _vllm_argv(
    words: list[str],
    volumes: list[Volume],
    ip: str,
    vllm_python: Path | None,
    resolve_model: Callable[[str], str] | None,
) -> list[str]:
    """vLLM's server from its virtualenv, with the container's flags; the image's entrypoint
    (``vllm serve [MODEL]`` or ``python3 -m vllm.entrypoints.openai.api_server``) is dropped and a
    model this machine cannot download is served from its local copy."""
    if vllm_python is None or not vllm_python.exists():
        raise PodSpecError(
            f"a vLLM pod needs vLLM's virtualenv ({vllm_python or 'none given'}): run `make vllm`"
        )
    if VLLM_MODULE in words:
        words = words[words.index(VLLM_MODULE) + 1 :]
    elif words[:2] == ["vllm", "serve"]:
        words = words[2:]
        if words and not words[0].startswith("-"):
            words = ["--model", *words]
    args = [_localize(w, volumes, ip) for w in words]
    for i, word in enumerate(args):
        flag, eq, value = word.partition("=")
        if word == "--model" and i + 1 < len(args):
            args[i + 1] = _model(args[i + 1], resolve_model)
        elif flag == "--model" and eq:
            args[i] = f"--model={_model(value, resolve_model)}"
    return [str(vllm_python), "-m", VLLM_MODULE, *args]


def _model(name: str, resolve_model: Callable[[str], str] | None) -> str:
    builtin = OFFLINE_MODELS.get(name, name if name.startswith("builtin:") else None)
    if builtin is None:
        return name
    if resolve_model is None:
        raise PodSpecError(f"--model {name}: the runner cannot resolve builtin models here")
    return resolve_model(builtin)


def plan(
    pod: Pod,
    ip: str,
    venv_bin: Path,
    pod_dir: Path,
    claims_dir: Path,
    lookup: Lookup,
    host_env: Mapping[str, str],
    vllm_python: Path | None = None,
    resolve_model: Callable[[str], str] | None = None,
) -> LocalPlan:
    """The local process for a pod that program_of() recognises; a vLLM pod needs ``vllm_python``
    (vLLM's virtualenv) and ``resolve_model`` (a builtin model id -> its local directory)."""
    program = program_of(pod)
    if program is None:
        raise PodSpecError(
            "the pod runs no LoraFleet program (no lorafleet.io/pool label, no lorafleet-operator or "
            "lorafleet-gateway)"
        )
    container = _main_container(pod, program)
    volumes = _volumes(pod, container, pod_dir, claims_dir)
    words = [*(container.get("command") or []), *(container.get("args") or [])]
    if program == VLLM:
        argv = _vllm_argv(words, volumes, ip, vllm_python, resolve_model)
    else:
        # The image's entrypoint is the program; a command naming it is replaced by the venv's script.
        if words and os.path.basename(words[0]) == program:
            words = words[1:]
        argv = [str(venv_bin / program), *(_localize(w, volumes, ip) for w in words)]
    if program in (TRAINER, VLLM) and not any(w == "--host" or w.startswith("--host=") for w in argv):
        argv += ["--host", ip]
    resolved = _env(pod, container, ip, lookup)
    env = {k: v for k, v in host_env.items() if k in PASSTHROUGH_ENV}
    bin_dir = vllm_python.parent if program == VLLM and vllm_python is not None else venv_bin
    env["PATH"] = f"{bin_dir}{os.pathsep}{host_env.get('PATH', '/usr/bin:/bin')}"
    env.update({k: _localize(v, volumes, ip) for k, v in resolved.items()})
    return LocalPlan(program, argv, env, volumes, _readiness(container), str(container.get("name", "")))
