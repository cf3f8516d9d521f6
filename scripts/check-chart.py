#!/usr/bin/env python3
"""Checks the Helm chart charts/ballast with Helm's own engine and Kubernetes' own schemas.

For the default values and for every values file in charts/ballast/ci/ (or those given with
--values):
  1. lint: Helm's linter (strict: warnings fail), through helm-python-sdk, which embeds Helm's
     Go SDK (no helm binary);
  2. render: Helm's template engine, with values.schema.json enforced as `helm install` does;
  3. validate: every rendered object against the OpenAPI schema of the oldest Kubernetes release
     the chart supports and of the newest one kubernetes-validate knows, in strict mode (unknown
     fields fail). An object kind without a schema fails too;
  4. assert: targeted checks that the objects fit together (driver name, mount propagation,
     StorageClass parameters, images, selectors, service accounts, the scheduler extender's
     configuration) and match the values they were rendered from.

Then the negative checks, which show that the checks can fail: values that violate
values.schema.json, values that the templates refuse, and a rendered object with an unknown field
must all be rejected. examples/*.yaml are validated as Kubernetes objects too.

Runs with the interpreter of scripts/install-prerequisites.sh's virtual environment
(~/.cache/ballast/venv). Exit status 0 when every check passed.

  scripts/check-chart.py                       # everything
  scripts/check-chart.py --values FILE...      # lint, render, validate, assert these only
  scripts/check-chart.py --chart DIR           # another copy of the chart
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import traceback
from typing import Any, Callable

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
except ImportError:
    # Started with another interpreter (e.g. `scripts/check-chart.py` through /usr/bin/env):
    # use the virtual environment of scripts/install-prerequisites.sh when it exists.
    VENV_PYTHON = os.path.expanduser("~/.cache/ballast/venv/bin/python3")
    if os.path.exists(VENV_PYTHON) and os.path.realpath(sys.prefix) != os.path.realpath(
            os.path.dirname(os.path.dirname(VENV_PYTHON))):
        os.execv(VENV_PYTHON, [VENV_PYTHON, *sys.argv])
    sys.exit("check-chart.py needs helm-python-sdk and kubernetes-validate: "
             "run scripts/install-prerequisites.sh")

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CHART = os.path.join(REPOSITORY, "charts", "ballast")
RELEASE = "ballast"
NAMESPACE = "ballast-system"
DRIVER = "csi.ballast.io"
# The oldest release Chart.yaml's kubeVersion admits, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
CLUSTER_SCOPED = {
    "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass", "PriorityClass",
}


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---- rendering ----------------------------------------------------------------------------------

def load_values(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    with open(path) as file:
        return helm.values_from_yaml(file.read())


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Renders like `helm install` and returns every object (NOTES.txt excluded)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document is None:
                continue
            check(isinstance(document, dict), f"{template}: a document is not a mapping")
            document.setdefault("metadata", {})
            document["_template"] = template
            objects.append(document)
    return objects


def without_template(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key != "_template"}


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate(obj: dict[str, Any], version: str) -> None:
    """Strict OpenAPI validation; a missing schema is a failure, not a warning."""
    try:
        kubernetes_validate.validate(without_template(obj), version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        raise CheckFailed(f"{name_of(obj)} ({obj.get('_template')}) is invalid for Kubernetes "
                          f"{error.version}: {path}: {error.message}") from None
    except kubernetes_validate.SchemaNotFoundError as error:
        raise CheckFailed(f"{name_of(obj)}: {error.message}") from None


# ---- helpers over rendered objects --------------------------------------------------------------

def find(objects, kind, name=None):
    return [o for o in objects if o.get("kind") == kind
            and (name is None or o["metadata"].get("name") == name)]


def one(objects, kind, name=None):
    found = find(objects, kind, name)
    check(len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}")
    return found[0]


def component(objects, kind, component_name):
    found = [o for o in find(objects, kind)
             if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component_name]
    check(len(found) == 1,
          f"expected one {kind} with component {component_name}, found {len(found)}")
    return found[0]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def container(spec, name, init=False):
    containers = spec.get("initContainers" if init else "containers", [])
    found = [c for c in containers if c["name"] == name]
    check(len(found) == 1, f"container {name} not found (have {[c['name'] for c in containers]})")
    return found[0]


def node_env_field(container_spec, name):
    """The fieldRef path of environment variable `name` (None when absent or not a fieldRef)."""
    for variable in container_spec.get("env", []):
        if variable["name"] == name:
            return variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return None


def argument(container_spec, flag):
    """The value of --flag=value in a container's args (None when absent)."""
    prefix = f"--{flag}="
    values = [a[len(prefix):] for a in container_spec.get("args", []) if a.startswith(prefix)]
    check(len(values) <= 1, f"{container_spec['name']}: --{flag} given {len(values)} times")
    return values[0] if values else None


def image_of(image_values, app_version):
    return f"{image_values['repository']}:{image_values.get('tag') or app_version}"


def fullname(values):
    """The chart's base name for objects, as _helpers.tpl's ballast.fullname computes it."""
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:40].rstrip("-")
    name = values.get("nameOverride") or "ballast"
    base = RELEASE if name in RELEASE else f"{RELEASE}-{name}"
    return base[:40].rstrip("-")


def node_selector_parameter(selector):
    return ",".join(f"{key}={selector[key]}" for key in sorted(selector))


# ---- targeted assertions ------------------------------------------------------------------------

def assert_objects(objects: list[dict[str, Any]], values: dict[str, Any], app_version: str) -> int:
    """Checks that rendered objects fit together and follow `values` (merged). Returns how many
    assertion groups ran."""
    groups = 0
    ballast_image = image_of(values["image"], app_version)
    sidecars = values["csi"]["sidecars"]
    fqdn = f"{fullname(values)}-node.{NAMESPACE}.svc.{values['clusterDomain']}"
    service_endpoint = f"http://{fqdn}:{values['storage']['port']}"

    # Every object: no empty (null) fields, which a template left without a value; namespaced
    # ones in the release's namespace, cluster-scoped ones without.
    def nulls(node, path):
        if node is None:
            yield path
        elif isinstance(node, dict):
            for key, value in node.items():
                yield from nulls(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from nulls(value, f"{path}[{index}]")

    for obj in objects:
        empty = list(nulls(without_template(obj), ""))
        check(not empty, f"{name_of(obj)} has empty fields: {', '.join(empty)}")
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED:
            check(namespace is None, f"{name_of(obj)} is cluster-scoped but has a namespace")
        else:
            check(namespace == NAMESPACE, f"{name_of(obj)} is in namespace {namespace!r}")
        check(obj["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE,
              f"{name_of(obj)} lacks the app.kubernetes.io/instance label")
    groups += 1

    # Workloads: selectors match their pod labels; every image comes from the values; every
    # service account exists; probe ports are declared.
    allowed_images = {ballast_image}
    for sidecar in sidecars.values():
        allowed_images.add(image_of(sidecar["image"], app_version))
    if values["extender"]["image"]["repository"]:
        allowed_images.add(image_of(values["extender"]["image"], app_version))
    service_accounts = {o["metadata"]["name"] for o in find(objects, "ServiceAccount")}
    workloads = [o for o in objects if o["kind"] in ("Deployment", "DaemonSet")]
    pods = [(w["metadata"]["name"], pod_spec(w), w["spec"]["template"]["metadata"]["labels"])
            for w in workloads]
    pods += [(p["metadata"]["name"], p["spec"], p["metadata"].get("labels", {}))
             for p in find(objects, "Pod")]
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        check(all(labels.get(k) == v for k, v in selector.items()),
              f"{name_of(workload)}: selector {selector} does not match its pod labels")
    for name, spec, _ in pods:
        account = spec.get("serviceAccountName")
        if account:
            check(account in service_accounts, f"{name}: service account {account} not rendered")
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            check(c["image"] in allowed_images,
                  f"{name}/{c['name']}: image {c['image']} is not one set in the values")
            port_names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = c.get(probe, {}).get("tcpSocket") or c.get(probe, {}).get("httpGet")
                if action and isinstance(action.get("port"), str):
                    check(action["port"] in port_names,
                          f"{name}/{c['name']}: {probe} uses undeclared port {action['port']}")
    groups += 1

    # RBAC: bindings name rendered roles and service accounts.
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        role_kind = binding["roleRef"]["kind"]
        check(find(objects, role_kind, binding["roleRef"]["name"]),
              f"{name_of(binding)} refers to missing {role_kind} {binding['roleRef']['name']}")
        for subject in binding["subjects"]:
            check(subject["name"] in service_accounts and subject["namespace"] == NAMESPACE,
                  f"{name_of(binding)}: subject {subject} is not a rendered service account")
    if not values["rbac"]["create"]:
        check(not find(objects, "ClusterRole") and not find(objects, "Role"),
              "rbac.create false still renders roles")
    groups += 1

    # Services select pods that some workload runs.
    for service in find(objects, "Service"):
        selector = service["spec"]["selector"]
        check(any(all(labels.get(k) == v for k, v in selector.items()) for _, _, labels in pods),
              f"{name_of(service)}: selector {selector} matches no rendered pod")
    groups += 1

    storage = values["storage"]
    if storage["enabled"]:
        groups += assert_storage(objects, values, ballast_image, service_endpoint)
    else:
        check(not find(objects, "DaemonSet", f"{fullname(values)}-node"), "storage.enabled false renders nodes")

    csi = values["csi"]
    if csi["enabled"]:
        driver = one(objects, "CSIDriver")
        check(driver["metadata"]["name"] == DRIVER, f"CSIDriver is named {driver['metadata']['name']}")
        check(driver["spec"]["attachRequired"] is False, "CSIDriver: attachRequired must be false")
        check(driver["spec"]["volumeLifecycleModes"] == ["Persistent"],
              "CSIDriver: volumeLifecycleModes must be [Persistent]")
        check(driver["spec"]["podInfoOnMount"] == csi["driver"]["podInfoOnMount"],
              "CSIDriver: podInfoOnMount does not follow csi.driver.podInfoOnMount")
        check(driver["spec"]["fsGroupPolicy"] == csi["driver"]["fsGroupPolicy"],
              "CSIDriver: fsGroupPolicy does not follow csi.driver.fsGroupPolicy")
        groups += 1
        groups += assert_csi_controller(objects, values, ballast_image, service_endpoint)
        groups += assert_csi_node(objects, values, ballast_image, service_endpoint)
    else:
        check(not find(objects, "CSIDriver"), "csi.enabled false still renders a CSIDriver")

    # StorageClasses: one per value entry, parameters as given, provisioner = the driver.
    classes = find(objects, "StorageClass")
    check(len(classes) == len(values["storageClasses"]),
          f"{len(values['storageClasses'])} storageClasses in values, {len(classes)} rendered")
    defaults = 0
    for wanted in values["storageClasses"]:
        rendered = one(objects, "StorageClass", wanted["name"])
        check(rendered["provisioner"] == DRIVER,
              f"StorageClass {wanted['name']}: provisioner {rendered['provisioner']} is not {DRIVER}")
        parameters = rendered.get("parameters", {})
        check(parameters.get("replication") == str(wanted["replication"]),
              f"StorageClass {wanted['name']}: replication {parameters.get('replication')!r}, "
              f"values say {wanted['replication']}")
        check(parameters.get("replicationMinimum") == str(wanted["replicationMinimum"]),
              f"StorageClass {wanted['name']}: replicationMinimum {parameters.get('replicationMinimum')!r}")
        selector = wanted.get("nodeSelector") or {}
        if selector:
            check(parameters.get("nodeSelector") == node_selector_parameter(selector),
                  f"StorageClass {wanted['name']}: nodeSelector {parameters.get('nodeSelector')!r}, "
                  f"expected {node_selector_parameter(selector)!r}")
        else:
            check("nodeSelector" not in parameters,
                  f"StorageClass {wanted['name']}: empty nodeSelector rendered")
        for key, value in parameters.items():
            check(isinstance(value, str), f"StorageClass {wanted['name']}: parameter {key} is not a string")
        is_default = rendered["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"]
        check(is_default == ("true" if wanted.get("default") else "false"),
              f"StorageClass {wanted['name']}: is-default-class {is_default}")
        defaults += is_default == "true"
        for field, default in (("reclaimPolicy", "Delete"), ("volumeBindingMode", "WaitForFirstConsumer"),
                               ("allowVolumeExpansion", True)):
            check(rendered.get(field) == wanted.get(field, default),
                  f"StorageClass {wanted['name']}: {field} {rendered.get(field)!r}, "
                  f"expected {wanted.get(field, default)!r}")
    check(defaults <= 1, f"{defaults} default StorageClasses")
    groups += 1

    # helm test: a hook PVC on a rendered class and a hook Pod that mounts it.
    if values["tests"]["enabled"]:
        claim = one(objects, "PersistentVolumeClaim", f"{fullname(values)}-test")
        pod = one(objects, "Pod", f"{fullname(values)}-test")
        for hook in (claim, pod):
            check(hook["metadata"]["annotations"].get("helm.sh/hook") == "test",
                  f"{name_of(hook)} is not a test hook")
        check(int(claim["metadata"]["annotations"]["helm.sh/hook-weight"])
              < int(pod["metadata"]["annotations"]["helm.sh/hook-weight"]),
              "the test PVC must be created before the test Pod")
        check(find(objects, "StorageClass", claim["spec"]["storageClassName"])
              or values["tests"]["storageClassName"],
              f"test PVC uses StorageClass {claim['spec']['storageClassName']}, not rendered")
        check(claim["spec"]["resources"]["requests"]["storage"] == values["tests"]["size"],
              "test PVC size does not follow tests.size")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        check(claims == [claim["metadata"]["name"]], "the test Pod does not mount the test PVC")
        script = " ".join(container(pod["spec"], "write-read")["command"])
        check("/data/probe" in script and "sha256sum" in script,
              "the test Pod does not write and read back")
        groups += 1
    else:
        check(not find(objects, "Pod"), "tests.enabled false still renders the test Pod")

    extender = values["extender"]
    if extender["enabled"]:
        groups += assert_extender(objects, values, service_endpoint)
    else:
        check(not [o for o in objects
                   if o["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                   == "scheduler-extender"], "extender.enabled false still renders the extender")
    return groups


def assert_storage(objects, values, ballast_image, service_endpoint) -> int:
    storage = values["storage"]
    block = storage["device"]["type"] == "block"
    daemonset = one(objects, "DaemonSet", f"{fullname(values)}-node")
    spec = pod_spec(daemonset)
    node = container(spec, "ballast-node")
    prepare = container(spec, "prepare-device", init=True)
    check(prepare["command"] == ["ballast-node-prepare"], "the init container must run ballast-node-prepare")
    environment = {e["name"]: e.get("value") for e in prepare["env"]}
    check(environment["BALLAST_DEVICE_TYPE"] == storage["device"]["type"], "BALLAST_DEVICE_TYPE")
    check(environment["BALLAST_DEVICE_PATH"] == storage["device"]["path"], "BALLAST_DEVICE_PATH")
    check(environment["BALLAST_FORMAT_NONEMPTY"] == str(storage["device"]["formatNonEmpty"]).lower(),
          "BALLAST_FORMAT_NONEMPTY")
    node_name = [e for e in prepare["env"] if e["name"] == "BALLAST_NODE_NAME"][0]
    check(node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName",
          "BALLAST_NODE_NAME must come from spec.nodeName")
    command = " ".join(node["command"])
    state_dir = storage["hostPath"].rstrip("/") + "/state"
    check(f'--label "{storage["nodeNameLabel"]}=$NODE_NAME"' in command,
          f"storage nodes must be labelled {storage['nodeNameLabel']}=<node name>: {command}")
    check(f'--down-grace-ms {storage["downGraceMs"]}' in command,
          f"storage nodes must get --down-grace-ms {storage['downGraceMs']}: {command}")
    check(f'--state-cache-mib {storage["stateCacheMiB"]}' in command,
          f"storage nodes must get --state-cache-mib {storage['stateCacheMiB']}: {command}")
    check(node_env_field(node, "NODE_NAME") == "spec.nodeName", "NODE_NAME must come from spec.nodeName")
    check("ballast-node run" in command and f"--listen 0.0.0.0:{storage['port']}" in command
          and f'--state-dir "{state_dir}"' in command and "/run/ballast/device" in command,
          f"ballast-node command: {command}")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    check(host_paths.get("ballast-host") == storage["hostPath"], "state hostPath does not follow storage.hostPath")
    for c in (node, prepare):
        context = c["securityContext"]
        check(bool(context.get("privileged")) == block,
              f"{c['name']}: privileged must be {block} for a {storage['device']['type']} device")
        if not block:
            check(context["capabilities"]["drop"] == ["ALL"], f"{c['name']}: capabilities not dropped")
            check(context["allowPrivilegeEscalation"] is False, f"{c['name']}: privilege escalation")
        check(context["seccompProfile"]["type"] == "Unconfined",
              f"{c['name']}: io_uring needs an unconfined seccomp profile")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        check(mounts.get("ballast-host") == storage["hostPath"], f"{c['name']}: hostPath mount")
        check(("host-dev" in mounts) == block, f"{c['name']}: /dev is mounted iff the device is a block device")
    check(spec.get("hostNetwork", False) == storage["hostNetwork"], "hostNetwork does not follow the values")
    check(node["resources"] == storage["resources"], "storage node resources do not follow the values")
    strategy = daemonset["spec"]["updateStrategy"]
    check(strategy["type"] == storage["updateStrategy"]["type"], "updateStrategy type")
    if strategy["type"] == "RollingUpdate":
        check(strategy["rollingUpdate"]["maxUnavailable"] == storage["updateStrategy"]["maxUnavailable"],
              "updateStrategy maxUnavailable")
    for key in ("nodeSelector", "tolerations"):
        if storage[key]:
            check(spec.get(key) == storage[key], f"storage node {key} does not follow the values")
    config = one(objects, "ConfigMap", f"{fullname(values)}-node-config")
    lines = [line.split() for line in config["data"]["nodes"].splitlines()
             if line.strip() and not line.startswith("#")]
    check(len(lines) == len(storage["nodes"]), f"node config has {len(lines)} lines for {len(storage['nodes'])} nodes")
    for line, wanted in zip(lines, storage["nodes"]):
        check(line == [wanted["name"], wanted.get("device") or "-",
                       str(wanted["nodeId"]) if wanted.get("nodeId") else "-"],
              f"node config line {line} does not match {wanted}")
    if storage["podDisruptionBudget"]["enabled"]:
        budget = one(objects, "PodDisruptionBudget", f"{fullname(values)}-node")
        check(budget["spec"]["maxUnavailable"] == storage["podDisruptionBudget"]["maxUnavailable"],
              "PodDisruptionBudget maxUnavailable")
        check(budget["spec"]["selector"]["matchLabels"] == daemonset["spec"]["selector"]["matchLabels"],
              "the PodDisruptionBudget does not select the storage nodes")
    # Clustering: one bootstrap node, everyone else joins through the Service with the secret.
    node_environment = {e["name"]: e for e in node["env"]}
    cluster = storage["cluster"]
    bootstrap = cluster["bootstrapNode"] or (storage["nodes"][0]["name"] if storage["nodes"] else "")
    check(node_environment["BALLAST_BOOTSTRAP_NODE"]["value"] == bootstrap,
          f"BALLAST_BOOTSTRAP_NODE should be {bootstrap!r}")
    check(node_environment["BALLAST_JOIN_ADDRESS"]["value"] == service_endpoint,
          "storage nodes must join through the storage Service")
    check('--join "$BALLAST_JOIN_ADDRESS"' in command and "--advertise" in command,
          f"ballast-node command lacks --join/--advertise: {command}")
    secret_name = cluster["joinSecretName"] or f"{fullname(values)}-join"
    reference = node_environment["BALLAST_JOIN_SECRET"]["valueFrom"]["secretKeyRef"]
    check(reference == {"name": secret_name, "key": "join-secret"}, f"join secret reference {reference}")
    rendered_secret = find(objects, "Secret", secret_name)
    check(bool(rendered_secret) == (not cluster["joinSecretName"]),
          "the chart renders the join Secret exactly when no existing one is named")
    headless = one(objects, "Service", f"{fullname(values)}-node-peers")
    check(headless["spec"]["clusterIP"] == "None", "the peers Service must be headless")
    service = one(objects, "Service", f"{fullname(values)}-node")
    check(service["spec"]["ports"][0]["port"] == storage["port"], "storage Service port")
    return 1


def assert_csi_controller(objects, values, ballast_image, service_endpoint) -> int:
    csi = values["csi"]
    sidecars = csi["sidecars"]
    deployment = one(objects, "Deployment", f"{fullname(values)}-csi-controller")
    spec = pod_spec(deployment)
    plugin = container(spec, "ballast-csi")
    check(plugin["image"] == ballast_image, "controller plugin image")
    check(plugin["command"] == ["ballast-csi"], "controller runs ballast-csi")
    check(argument(plugin, "mode") == "controller", "controller --mode")
    check(argument(plugin, "endpoint") == "unix:///csi/csi.sock", "controller --endpoint")
    check(argument(plugin, "node-id") == "$(KUBE_NODE_NAME)", "controller --node-id")
    check(argument(plugin, "ballast-endpoint") == (csi["ballastEndpoint"] or service_endpoint),
          f"controller --ballast-endpoint {argument(plugin, 'ballast-endpoint')}")
    check(argument(plugin, "fuse-binary") == "/usr/local/bin/ballast-fuse", "controller --fuse-binary")
    check(argument(plugin, "state-dir") == "/var/lib/ballast-csi", "controller --state-dir")
    check(plugin["livenessProbe"]["failureThreshold"] * plugin["livenessProbe"]["periodSeconds"] >= 600,
          "the controller's liveness probe must tolerate 10 minutes of Probe ready=false "
          "(a storage node restart) before restarting the plugin")
    expected = {"ballast-csi", "csi-provisioner", "csi-resizer", "liveness-probe"}
    if sidecars["snapshotter"]["enabled"]:
        expected.add("csi-snapshotter")
    names = {c["name"] for c in spec["containers"]}
    check(names == expected, f"controller containers {sorted(names)}, expected {sorted(expected)}")
    for name, key in (("csi-provisioner", "provisioner"), ("csi-resizer", "resizer"),
                      ("liveness-probe", "livenessProbe"), ("csi-snapshotter", "snapshotter")):
        if name in names:
            sidecar = container(spec, name)
            check(sidecar["image"] == image_of(sidecars[key]["image"], ""),
                  f"{name} image {sidecar['image']} does not follow csi.sidecars.{key}.image")
            check(argument(sidecar, "csi-address") == "/csi/csi.sock", f"{name} --csi-address")
            mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
            check(mounts.get("socket-dir") == "/csi", f"{name} does not share the socket directory")
    provisioner = container(spec, "csi-provisioner")
    check("--leader-election" in provisioner["args"], "provisioner without leader election")
    check("--extra-create-metadata" in provisioner["args"],
          "the provisioner must pass PVC metadata (the extender finds volumes by it)")
    check(argument(provisioner, "feature-gates") == "Topology=true", "provisioner without topology")
    check(spec["securityContext"]["runAsNonRoot"] is True, "the controller pod must not run as root")
    check(not any(c.get("securityContext", {}).get("privileged") for c in spec["containers"]),
          "no controller container may be privileged")
    # RBAC the sidecars need.
    rules = {r["metadata"]["name"]: r["rules"] for r in find(objects, "ClusterRole")}
    if values["rbac"]["create"]:
        provisioner_rules = rules[f"{fullname(values)}-csi-controller-provisioner"]
        check(any("persistentvolumes" in r["resources"] and "create" in r["verbs"] for r in provisioner_rules),
              "the provisioner may not create PersistentVolumes")
        resizer_rules = rules[f"{fullname(values)}-csi-controller-resizer"]
        check(any("persistentvolumeclaims/status" in r["resources"] and "patch" in r["verbs"]
                  for r in resizer_rules), "the resizer may not patch PVC status")
        one(objects, "Role", f"{fullname(values)}-csi-controller-leader-election")
    return 1


def assert_csi_node(objects, values, ballast_image, service_endpoint) -> int:
    csi = values["csi"]
    node_values = csi["node"]
    kubelet_dir = node_values["kubeletDir"].rstrip("/")
    daemonset = one(objects, "DaemonSet", f"{fullname(values)}-csi-node")
    spec = pod_spec(daemonset)
    plugin = container(spec, "ballast-csi")
    check(plugin["command"] == ["ballast-csi"], "node plugin runs ballast-csi")
    check(argument(plugin, "mode") == "node", "node plugin --mode")
    check(argument(plugin, "endpoint") == "unix:///csi/csi.sock", "node plugin --endpoint")
    check(argument(plugin, "node-id") == "$(KUBE_NODE_NAME)", "node plugin --node-id")
    environment = {e["name"]: e for e in plugin["env"]}
    check(environment["KUBE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName",
          "KUBE_NODE_NAME must come from spec.nodeName")
    endpoint = argument(plugin, "ballast-endpoint")
    if node_values["endpointMode"] == "local":
        check(endpoint == f"http://$(KUBE_NODE_IP):{values['storage']['port']}",
              f"node plugin in local mode talks to {endpoint}")
        check(environment["KUBE_NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP",
              "KUBE_NODE_IP must come from status.hostIP")
    else:
        check(endpoint == (csi["ballastEndpoint"] or service_endpoint), f"node plugin talks to {endpoint}")
    check(argument(plugin, "state-dir") == node_values["stateDir"], "node plugin --state-dir")
    check(argument(plugin, "fuse-binary") == "/usr/local/bin/ballast-fuse", "node plugin --fuse-binary")
    check(plugin["securityContext"].get("privileged") is True, "the node plugin must be privileged (FUSE mounts)")
    check(spec.get("hostPID", False) == node_values["hostPID"], "hostPID does not follow csi.node.hostPID")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    kubelet = mounts.get("kubelet-dir")
    check(kubelet is not None and kubelet.get("mountPropagation") == "Bidirectional",
          "the node plugin must mount the kubelet directory with Bidirectional propagation")
    check(kubelet["mountPath"] == kubelet_dir == volumes["kubelet-dir"]["hostPath"]["path"],
          "the kubelet directory must be mounted at the same path as on the host")
    check(plugin["livenessProbe"]["failureThreshold"] * plugin["livenessProbe"]["periodSeconds"] >= 600,
          "the node plugin's liveness probe must tolerate 10 minutes of Probe ready=false "
          "(a storage node restart) before restarting the plugin")
    mounter_values = csi["mounter"]
    mounter_dir = mounter_values["directory"].rstrip("/")
    if mounter_values["enabled"]:
        check(argument(plugin, "mounter-socket") == f"{mounter_dir}/mounter.sock",
              "the node plugin must delegate its FUSE processes to the mounter's socket")
        check(mounts["mounter-dir"]["mountPath"] == mounter_dir == volumes["mounter-dir"]["hostPath"]["path"],
              "the node plugin must see the mounter's directory at the host path")
        check("mountPropagation" not in mounts["mounter-dir"], "the mounter's socket directory needs no propagation")
        check("fuse-device" not in mounts, "with the mounter, the node plugin needs no /dev/fuse")
        assert_csi_mounter(objects, values, endpoint)
    else:
        check(argument(plugin, "mounter-socket") is None, "mounter disabled, yet the plugin names its socket")
        check(not find(objects, "DaemonSet", f"{fullname(values)}-csi-mounter"),
              "csi.mounter.enabled false still renders the mounter")
        check(mounts["fuse-device"]["mountPath"] == "/dev/fuse"
              and volumes["fuse-device"]["hostPath"]["path"] == "/dev/fuse", "the node plugin needs /dev/fuse")
    # The socket: the plugin's /csi is <kubelet>/plugins/<driver>, which the registrar announces.
    plugin_dir = f"{kubelet_dir}/plugins/{DRIVER}"
    check(volumes["plugin-dir"]["hostPath"]["path"] == plugin_dir,
          f"plugin socket directory {volumes['plugin-dir']['hostPath']['path']} is not {plugin_dir}")
    check(mounts["plugin-dir"]["mountPath"] == "/csi", "the plugin's socket directory is not /csi")
    registrar = container(spec, "node-driver-registrar")
    check(registrar["image"] == image_of(csi["sidecars"]["nodeDriverRegistrar"]["image"], ""),
          "registrar image does not follow the values")
    check(argument(registrar, "kubelet-registration-path") == f"{plugin_dir}/csi.sock",
          f"registrar announces {argument(registrar, 'kubelet-registration-path')}, "
          f"the plugin listens in {plugin_dir}")
    check(volumes["registration-dir"]["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry",
          "registration directory")
    probe = container(spec, "liveness-probe")
    check(argument(probe, "health-port") == str(csi["sidecars"]["livenessProbe"]["nodePort"]),
          "node livenessprobe port")
    tolerations = spec.get("tolerations", [])
    check(tolerations == node_values["tolerations"], "node plugin tolerations do not follow the values")
    return 1


def assert_csi_mounter(objects, values, node_plugin_endpoint) -> None:
    """ballast-csi-mounter: its own DaemonSet on the node plugin's nodes, never restarted by a
    probe, owning the FUSE mounts under the kubelet directory with Bidirectional propagation."""
    csi = values["csi"]
    node_values = csi["node"]
    mounter_values = csi["mounter"]
    kubelet_dir = node_values["kubeletDir"].rstrip("/")
    mounter_dir = mounter_values["directory"].rstrip("/")
    daemonset = one(objects, "DaemonSet", f"{fullname(values)}-csi-mounter")
    check(daemonset["spec"]["updateStrategy"]["type"] == mounter_values["updateStrategy"],
          "the mounter's updateStrategy does not follow csi.mounter.updateStrategy")
    spec = pod_spec(daemonset)
    check(spec.get("automountServiceAccountToken") is False, "the mounter needs no Kubernetes API token")
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        check(spec.get(field) == (node_values[field] or None),
              f"the mounter's {field} must be the node plugin's (it serves the plugin on each node)")
    (main,) = spec["containers"]
    check(main["name"] == "ballast-csi-mounter" and main["command"] == ["ballast-csi-mounter"],
          "the mounter runs ballast-csi-mounter")
    check(main["args"][0] == "serve", "the mounter runs `ballast-csi-mounter serve`")
    check(argument(main, "socket") == f"{mounter_dir}/mounter.sock", "mounter --socket")
    check(argument(main, "state-dir") == mounter_dir, "mounter --state-dir")
    check(argument(main, "mount-root") == kubelet_dir, "mounter --mount-root must be the kubelet directory")
    check(argument(main, "ballast-endpoint") == node_plugin_endpoint,
          "the FUSE processes must reach the storage node the node plugin reaches")
    check(argument(main, "fuse-binary") == "/usr/local/bin/ballast-fuse", "mounter --fuse-binary")
    check("livenessProbe" not in main, "a liveness probe would restart the mounter and end every mount")
    check(main["securityContext"].get("privileged") is True,
          "the mounter must be privileged (FUSE mounts with Bidirectional propagation)")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    kubelet = mounts.get("kubelet-dir")
    check(kubelet is not None and kubelet.get("mountPropagation") == "Bidirectional",
          "the mounter must mount the kubelet directory with Bidirectional propagation")
    check(kubelet["mountPath"] == kubelet_dir == volumes["kubelet-dir"]["hostPath"]["path"],
          "the mounter must mount the kubelet directory at the same path as on the host")
    check(mounts["mounter-dir"]["mountPath"] == mounter_dir == volumes["mounter-dir"]["hostPath"]["path"],
          "the mounter's directory must be the host path the node plugin mounts")
    check(mounts["fuse-device"]["mountPath"] == "/dev/fuse"
          and volumes["fuse-device"]["hostPath"]["path"] == "/dev/fuse", "the mounter needs /dev/fuse")


def assert_extender(objects, values, service_endpoint) -> int:
    extender = values["extender"]
    name = f"{fullname(values)}-scheduler-extender"
    deployment = one(objects, "Deployment", name)
    main = container(pod_spec(deployment), "extender")
    check(main["command"] == ["ballast-scheduler-extender"], "the extender runs ballast-scheduler-extender")
    check(argument(main, "listen") == f"0.0.0.0:{extender['port']}", "extender --listen")
    check(argument(main, "ballast-endpoint") == (extender["ballastEndpoint"] or service_endpoint),
          "extender --ballast-endpoint")
    check(argument(main, "filter-policy") == extender["filterPolicy"], "extender --filter-policy")
    check(argument(main, "node-name-label") == values["storage"]["nodeNameLabel"],
          "extender --node-name-label must be the label the storage nodes carry")
    check(argument(main, "cache-ttl-ms") == str(extender["cacheTtlMs"]), "extender --cache-ttl-ms")
    check(argument(main, "ballast-timeout-ms") == str(extender["ballastTimeoutMs"]),
          "extender --ballast-timeout-ms")
    for probe in ("readinessProbe", "livenessProbe"):
        check(main[probe].get("httpGet") == {"path": "/healthz", "port": "http"},
              f"extender {probe} must GET /healthz")
    check(pod_spec(deployment).get("automountServiceAccountToken") is False,
          "the extender needs no Kubernetes API token")
    check(not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
               and o["metadata"]["name"] == name],
          "the extender needs no RBAC")
    service = one(objects, "Service", name)
    check(service["spec"]["ports"][0]["port"] == extender["port"], "extender Service port")
    check(service["spec"]["type"] == extender["service"]["type"], "extender Service type")
    configmap = one(objects, "ConfigMap", f"{name}-scheduler-config")
    configuration = yaml.safe_load(configmap["data"]["scheduler-config.yaml"])
    check(configuration["apiVersion"] == "kubescheduler.config.k8s.io/v1"
          and configuration["kind"] == "KubeSchedulerConfiguration", "scheduler configuration kind")
    (entry,) = configuration["extenders"]
    url = extender["scheduler"]["urlPrefix"] or \
        f"http://{name}.{NAMESPACE}.svc.{values['clusterDomain']}:{extender['port']}"
    check(entry["urlPrefix"] == url, f"scheduler urlPrefix {entry['urlPrefix']}, expected {url}")
    check(entry["prioritizeVerb"] == "prioritize", "the extender serves /prioritize")
    check(entry.get("filterVerb") == ("filter" if extender["filterPolicy"] == "require" else None),
          "filterVerb is set exactly under filterPolicy require (prefer's filter passes every node)")
    check("managedResources" not in entry, "Ballast manages no extended resources")
    check(entry["weight"] == extender["scheduler"]["weight"], "extender weight")
    check(entry["ignorable"] == extender["scheduler"]["ignorable"], "extender ignorable")
    check(entry["nodeCacheCapable"] == extender["scheduler"]["nodeCacheCapable"], "nodeCacheCapable")
    allowed = {"urlPrefix", "filterVerb", "prioritizeVerb", "weight", "enableHTTPS",
               "nodeCacheCapable", "ignorable", "httpTimeout", "preemptVerb", "bindVerb",
               "tlsConfig", "managedResources"}
    check(set(entry) <= allowed, f"unknown Extender fields {set(entry) - allowed}")
    return 1


# ---- the runs -----------------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, description: str, action: Callable[[], str | None]) -> None:
        try:
            detail = action()
        except CheckFailed as error:
            self.failed += 1
            print(f"FAIL {description}: {error}")
        except helm.HelmError as error:
            self.failed += 1
            print(f"FAIL {description}: Helm: {type(error).__name__}: {error}")
        except Exception:  # noqa: BLE001 - a crash of a check is a failed check
            self.failed += 1
            print(f"FAIL {description}: unexpected error\n{traceback.format_exc()}")
        else:
            self.passed += 1
            print(f"ok   {description}{': ' + detail if detail else ''}")


def check_values_file(report: Report, chart_path: str, chart: helm.Chart, path: str | None) -> None:
    label = os.path.relpath(path, REPOSITORY) if path else "default values"
    values = load_values(path)
    app_version = chart.metadata.get("appVersion", "")

    def lint() -> str:
        findings = []
        for version in KUBERNETES_VERSIONS:
            result = helm.lint(chart_path, values, strict=True, namespace=NAMESPACE,
                               kube_version=f"v{version}")
            findings += [m for m in result["messages"] if m["severity"] >= 2] + \
                [{"severity": 3, "path": "", "error": e} for e in result.get("errors", [])]
        check(not findings, "helm lint: " + "; ".join(f"{m['path']}: {m['error']}" for m in findings))
        return f"Kubernetes {', '.join(KUBERNETES_VERSIONS)}"

    report.run(f"lint ({label})", lint)

    state: dict[str, Any] = {}

    def do_render() -> str:
        state["objects"] = render(chart, values)
        kinds: dict[str, int] = {}
        for obj in state["objects"]:
            kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
        return f"{len(state['objects'])} objects ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"

    report.run(f"render ({label})", do_render)
    if "objects" not in state:
        return

    def do_validate() -> str:
        for version in KUBERNETES_VERSIONS:
            for obj in state["objects"]:
                validate(obj, version)
        return f"{len(state['objects'])} objects, strict, Kubernetes {', '.join(KUBERNETES_VERSIONS)}"

    report.run(f"validate ({label})", do_validate)

    def do_assert() -> str:
        merged = chart.merge_values(values)
        groups = assert_objects(state["objects"], merged, app_version)
        return f"{groups} groups of assertions"

    report.run(f"assert ({label})", do_assert)


# Values that break values.schema.json: each must be refused by the schema and by rendering.
SCHEMA_VIOLATIONS = [
    ("unknown top-level key", {"storge": {"enabled": True}}),
    ("unknown nested key", {"storage": {"device": {"kind": "block"}}}),
    ("device type outside its enum", {"storage": {"device": {"type": "nvme"}}}),
    ("port as a string", {"storage": {"port": "7400"}}),
    ("port out of range", {"storage": {"port": 70000}}),
    ("relative hostPath", {"storage": {"hostPath": "var/lib/ballast"}}),
    ("file size without a number", {"storage": {"device": {"size": "big"}}}),
    ("per-node entry without a name", {"storage": {"nodes": [{"device": "/dev/sdb"}]}}),
    ("replication 0", {"storageClasses": [{"name": "zero", "replication": 0, "replicationMinimum": 1}]}),
    ("StorageClass without replication", {"storageClasses": [{"name": "bare"}]}),
    ("StorageClass name with capitals", {"storageClasses": [{"name": "Fast", "replication": 1,
                                                             "replicationMinimum": 1}]}),
    ("endpoint mode outside its enum", {"csi": {"node": {"endpointMode": "remote"}}}),
    ("fsGroupPolicy outside its enum", {"csi": {"driver": {"fsGroupPolicy": "Always"}}}),
    ("sidecar image without a tag", {"csi": {"sidecars": {"provisioner": {"image": {"tag": ""}}}}}),
    ("pull policy outside its enum", {"image": {"pullPolicy": "Sometimes"}}),
    ("extender nodePort out of range", {"extender": {"service": {"type": "NodePort", "nodePort": 80}}}),
    ("extender enabled as a string", {"extender": {"enabled": "yes"}}),
    ("extender filter policy outside its enum", {"extender": {"filterPolicy": "always"}}),
    ("extender Ballast timeout of 0", {"extender": {"ballastTimeoutMs": 0}}),
    ("node name label with a space", {"storage": {"nodeNameLabel": "kubernetes.io/host name"}}),
    ("down grace period below a second", {"storage": {"downGraceMs": 10}}),
    ("state block cache below 8 MiB", {"storage": {"stateCacheMiB": 4}}),
    ("test size in MB", {"tests": {"size": "64MB"}}),
    ("update strategy outside its enum", {"storage": {"updateStrategy": {"type": "Recreate"}}}),
    ("a mounter update strategy that does not exist", {"csi": {"mounter": {"updateStrategy": "Always"}}}),
]

# Values the schema accepts but the templates refuse (checks across values).
TEMPLATE_VIOLATIONS = [
    ("file device outside hostPath", {"storage": {"device": {"path": "/dev/sdb"}}}, "must be under storage.hostPath"),
    ("two default StorageClasses",
     {"storageClasses": [{"name": "a", "default": True, "replication": 1, "replicationMinimum": 1},
                         {"name": "b", "default": True, "replication": 1, "replicationMinimum": 1}]},
     "at most one class"),
    ("replicationMinimum above replication",
     {"storageClasses": [{"name": "a", "replication": 1, "replicationMinimum": 2}]}, "exceeds replication"),
    ("local endpoint without hostNetwork",
     {"storage": {"hostNetwork": False}, "csi": {"node": {"endpointMode": "local"}}}, "needs storage.hostNetwork"),
    ("a node listed twice",
     {"storage": {"nodes": [{"name": "n1"}, {"name": "n1"}]}}, "twice"),
]


def negative_checks(report: Report, chart: helm.Chart) -> None:
    for description, values in SCHEMA_VIOLATIONS:
        def refused(values=values) -> str:
            try:
                chart.validate_schema(values)
            except helm.HelmValuesError as error:
                message = str(error).strip().splitlines()[-1].strip()
            else:
                raise CheckFailed(f"values.schema.json accepts {json.dumps(values)}")
            try:
                render(chart, values)
            except helm.HelmValuesError:
                pass
            else:
                raise CheckFailed(f"rendering accepts {json.dumps(values)}")
            return message

        report.run(f"schema refuses {description}", refused)

    for description, values, expected in TEMPLATE_VIOLATIONS:
        def refused(values=values, expected=expected) -> str:
            chart.validate_schema(values)  # the schema alone lets these through
            try:
                render(chart, values)
            except helm.HelmRenderError as error:
                check(expected in str(error), f"refused, but not for the expected reason: {error}")
                return expected
            raise CheckFailed(f"rendering accepts {json.dumps(values)}")

        report.run(f"templates refuse {description}", refused)

    def validation_can_fail() -> str:
        objects = render(chart, {})
        daemonset = copy.deepcopy(one(objects, "DaemonSet", f"{RELEASE}-csi-node"))
        pod_spec(daemonset)["containers"][0]["volumeMounts"][1]["mountPropagtion"] = "Bidirectional"
        try:
            validate(daemonset, KUBERNETES_VERSIONS[-1])
        except CheckFailed as error:
            return str(error).split(": ", 1)[-1][:100]
        raise CheckFailed("strict validation accepted a misspelt field (mountPropagtion)")

    report.run("strict validation refuses an unknown field", validation_can_fail)

    def assertions_can_fail() -> str:
        objects = render(chart, {})
        daemonset = one(objects, "DaemonSet", f"{RELEASE}-csi-node")
        for mount in pod_spec(daemonset)["containers"][0]["volumeMounts"]:
            mount.pop("mountPropagation", None)
        try:
            assert_objects(objects, chart.merge_values({}), chart.metadata.get("appVersion", ""))
        except CheckFailed as error:
            check("Bidirectional" in str(error), f"failed for another reason: {error}")
            return str(error)[:100]
        raise CheckFailed("the assertions accepted a node plugin without mount propagation")

    report.run("assertions refuse a node plugin without Bidirectional propagation", assertions_can_fail)

    def mounter_assertions_can_fail() -> str:
        objects = render(chart, {})
        daemonset = one(objects, "DaemonSet", f"{RELEASE}-csi-mounter")
        for mount in pod_spec(daemonset)["containers"][0]["volumeMounts"]:
            mount.pop("mountPropagation", None)
        try:
            assert_objects(objects, chart.merge_values({}), chart.metadata.get("appVersion", ""))
        except CheckFailed as error:
            check("mounter" in str(error) and "Bidirectional" in str(error),
                  f"failed for another reason: {error}")
            return str(error)[:100]
        raise CheckFailed("the assertions accepted a mounter without mount propagation")

    report.run("assertions refuse a mounter without Bidirectional propagation", mounter_assertions_can_fail)


def check_examples(report: Report, chart_path: str) -> None:
    for path in sorted(glob.glob(os.path.join(chart_path, "examples", "*.yaml"))):
        def example(path=path) -> str:
            with open(path) as file:
                objects = [o for o in yaml.safe_load_all(file) if o]
            for obj in objects:
                obj.setdefault("metadata", {})
                for version in KUBERNETES_VERSIONS:
                    validate(obj, version)
            claims = find(objects, "PersistentVolumeClaim")
            check(claims, "the example has no PersistentVolumeClaim")
            classes = {c["name"] for c in yaml.safe_load(open(os.path.join(chart_path, "values.yaml")))["storageClasses"]}
            for claim in claims:
                check(claim["spec"].get("storageClassName") in classes,
                      f"{name_of(claim)} uses StorageClass {claim['spec'].get('storageClassName')}, "
                      f"not one of the chart's {sorted(classes)}")
            return f"{len(objects)} objects ({', '.join(name_of(o) for o in objects)})"

        report.run(f"example {os.path.relpath(path, REPOSITORY)}", example)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chart", default=DEFAULT_CHART, help="chart directory")
    parser.add_argument("--values", nargs="+", help="check only these values files")
    arguments = parser.parse_args()
    chart_path = os.path.abspath(arguments.chart)

    helm.disable_logging()
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate "
          f"{kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else '?'}, "
          f"chart {chart_path}")
    report = Report()
    with helm.Chart.load(chart_path) as chart:
        if arguments.values:
            for path in arguments.values:
                check_values_file(report, chart_path, chart, os.path.abspath(path))
        else:
            check_values_file(report, chart_path, chart, None)
            for path in sorted(glob.glob(os.path.join(chart_path, "ci", "*.yaml"))):
                check_values_file(report, chart_path, chart, path)
            negative_checks(report, chart)
            check_examples(report, chart_path)
    print(f"chart checks passed: {report.passed}, failed: {report.failed}")
    return 0 if report.failed == 0 and report.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
