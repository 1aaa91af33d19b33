"""The Kubernetes "restricted" Pod Security Standard as a checker of pod specs (baseline included).

Written from the standard's published control list (kubernetes.io/docs/concepts/security/
pod-security-standards, policy version "latest"): ``violations(spec)`` returns one line per broken
control, naming the field, for a PodSpec (or a workload's ``spec.template.spec``). An empty list
means the pod would be admitted into a namespace labelled ``pod-security.kubernetes.io/enforce:
restricted``.
"""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
    "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_ALLOWED = {"RuntimeDefault", "Localhost"}
APPARMOR_ALLOWED = {"RuntimeDefault", "Localhost"}


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(kind) or []):
            out.append((f"spec.{kind}[{i}]", c))
    return out


def violations(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every restricted-profile control ``spec`` breaks, as 'field: why'."""
    bad: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    # Baseline: host namespaces, host paths and ports, privileged, capabilities, SELinux, procMount,
    # seccomp, AppArmor, sysctls.
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(f"spec.{key}: must be unset or false")
    for i, v in enumerate(spec.get("volumes") or []):
        kinds = set(v) - {"name"}
        if "hostPath" in kinds:
            bad.append(f"spec.volumes[{i}].hostPath: forbidden")
        elif not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"spec.volumes[{i}]: type {sorted(kinds)} is not allowed")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad.append(f"spec.securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    for key, value in (annotations or {}).items():
        apparmor = key.startswith("container.apparmor.security.beta.kubernetes.io/")
        if apparmor and value != "runtime/default" and not value.startswith("localhost/"):
            bad.append(f"metadata.annotations[{key}]: AppArmor {value} is not allowed")
    bad += _context_violations("spec.securityContext", pod_sc, pod_level=True)

    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        for i, port in enumerate(c.get("ports") or []):
            if port.get("hostPort"):
                bad.append(f"{where}.ports[{i}].hostPort: must be unset or 0")
        bad += _context_violations(f"{where}.securityContext", sc, pod_level=False)
        if sc.get("privileged"):
            bad.append(f"{where}.securityContext.privileged: must be false")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}.securityContext.allowPrivilegeEscalation: must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}.securityContext.capabilities.drop: must include ALL")
        for cap in caps.get("add") or []:
            if cap != "NET_BIND_SERVICE":
                bad.append(f"{where}.securityContext.capabilities.add: {cap} is not allowed")
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}.securityContext.procMount: must be Default")
        non_root = sc.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            bad.append(f"{where}.securityContext.runAsNonRoot: must be true (here or on the pod)")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp is None and pod_seccomp is None:
            bad.append(f"{where}.securityContext.seccompProfile: must be set (here or on the pod)")
    return bad


def _context_violations(where: str, sc: dict[str, Any], pod_level: bool) -> list[str]:
    bad = []
    if sc.get("runAsUser") == 0:
        bad.append(f"{where}.runAsUser: must not be 0")
    if pod_level and sc.get("runAsNonRoot") is False:
        bad.append(f"{where}.runAsNonRoot: must not be false")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in SECCOMP_ALLOWED:
        bad.append(f"{where}.seccompProfile.type: {seccomp} is not allowed")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in APPARMOR_ALLOWED:
        bad.append(f"{where}.appArmorProfile.type: {apparmor} is not allowed")
    se = sc.get("seLinuxOptions") or {}
    if se.get("type", "") not in SELINUX_TYPES:
        bad.append(f"{where}.seLinuxOptions.type: {se['type']} is not allowed")
    for key in ("user", "role"):
        if se.get(key):
            bad.append(f"{where}.seLinuxOptions.{key}: must be unset")
    return bad


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(kind/name, pod spec, pod annotations) for every pod or pod template among ``docs``."""
    out = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "Pod":
            out.append((name, doc["spec"], doc.get("metadata", {}).get("annotations") or {}))
        elif doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            template = doc["spec"]["template"]
            out.append((name, template["spec"], template.get("metadata", {}).get("annotations") or {}))
        elif doc.get("kind") == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            out.append((name, template["spec"], template.get("metadata", {}).get("annotations") or {}))
    return out
