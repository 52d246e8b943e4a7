"""Kubeflow Trainer v2: the TrainingRuntime and TrainJobs of manifests/trainjob/ and of
pipeline/trainjob.py validate against the v2.3.0 CRDs (vendored in tests/schemas/, closed to
typos) and the rules the API server adds, their arguments pass `pirl.train --dry-run` at the
world size they imply, and their pod and failure handling are the project's (the PyTorchJob's
pod; permanent exit codes fail at once, the rest restart within a bound)."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline import pytorchjob, trainjob
from pipeline.jobspec import job_spec
from pirl import errors

from .k8s_helpers import TRAINER_SCHEMAS, kustomize_build, trainer_v2_errors
from .test_manifests import (
    ENTRYPOINT,
    IMAGE_REPOSITORY,
    MANIFESTS,
    VERSION,
    dry_run,
    kubectl,  # noqa: F401 (fixture)
    trainer_overrides,
)
from .test_pipeline import seed_spec

SEED_PRESET = "pretrain/pirl/pirl_jigsaw_4node_resnet50"
# (overlay, numNodes, numProcPerNode): the seed's 1-GPU, 8-GPU and 4 x 8-GPU commands
OVERLAYS = [("1gpu", 1, 1), ("8gpu", 1, 8), ("4node", 4, 8)]
# The torch plugin's environment, as listed in tests/schemas/README.md (Trainer v2.3.0 facts)
PLUGIN_ENV = [
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
]


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:  # noqa: F811
    return {
        overlay: kustomize_build(MANIFESTS / "trainjob" / "overlays" / overlay, kubectl)
        for overlay, _, _ in OVERLAYS
    }


def one(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def node_pod(runtime: dict) -> dict:
    return trainjob.node_job(runtime)["template"]


def seed_run(nodes: int, gpus: int) -> tuple[dict, dict]:
    """The same JobSpec the PyTorchJob tests build (tests/test_pipeline.py), as a TrainJob."""
    return trainjob.build_run(seed_spec(nodes, gpus))


# ---------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("overlay", [o for o, _, _ in OVERLAYS])
def test_manifest_objects_validate_against_the_v2_crds(rendered, overlay):
    objs = rendered[overlay]
    v2 = [o for o in objs if o["kind"] in ("TrainJob", "TrainingRuntime")]
    assert sorted(o["kind"] for o in v2) == ["TrainJob", "TrainingRuntime"]
    errors_found = [e for obj in v2 for e in trainer_v2_errors(obj)]
    assert not errors_found, "\n".join(errors_found)
    job, runtime = one(objs, "TrainJob"), one(objs, "TrainingRuntime")
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": runtime["metadata"]["name"],
    }


@pytest.mark.parametrize("overlay,nodes,procs", OVERLAYS)
def test_manifest_args_pass_dry_run_at_the_jobs_world_size(rendered, overlay, nodes, procs, capsys):
    job, runtime = one(rendered[overlay], "TrainJob"), one(rendered[overlay], "TrainingRuntime")
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, procs)
    node = trainjob.node_container(runtime)
    overrides = trainer_overrides({"command": node["command"], "args": trainer["args"]})
    assert overrides[0] == f"config={SEED_PRESET}"
    out = dry_run(overrides, nodes * procs, capsys)
    dist = out["config"]["DISTRIBUTED"]
    assert (dist["NUM_NODES"], dist["NUM_PROC_PER_NODE"]) == (nodes, procs)
    assert out["derived"]["world_size"] == nodes * procs
    assert out["config"]["CHECKPOINT"]["DIR"].startswith("s3://")
    gpus = trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == procs == int(trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"])


def test_manifest_jobs_have_their_own_names_and_checkpoints(rendered):
    jobs = [one(rendered[o], "TrainJob") for o, _, _ in OVERLAYS]
    assert len({j["metadata"]["name"] for j in jobs}) == len(jobs)
    dirs = [a for j in jobs for a in j["spec"]["trainer"]["args"] if "CHECKPOINT.DIR" in a]
    assert len(set(dirs)) == len(jobs)


def test_manifest_runtime_runs_the_pytorchjobs_pod(rendered, kubectl):  # noqa: F811
    """The TrainingRuntime's pod is the PyTorchJob base's pod (only the container's name, its
    ports and per-job resources/args differ, and restartPolicy Never for podFailurePolicy)."""
    runtime = one(rendered["4node"], "TrainingRuntime")
    (v1_job,) = [
        o for o in kustomize_build(MANIFESTS / "base", kubectl) if o["kind"] == "PyTorchJob"
    ]
    v1_pod = copy.deepcopy(v1_job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    v2_pod = copy.deepcopy(node_pod(runtime))
    (v1_container,) = v1_pod["spec"].pop("containers")
    (v2_container,) = v2_pod["spec"].pop("containers")
    assert v2_pod["spec"].pop("restartPolicy") == "Never"
    assert v2_pod == v1_pod
    for key in ("name", "ports", "resources", "args"):
        v1_container.pop(key, None)
    assert v2_container.pop("name") == "node"
    assert v2_container.pop("env") == [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    assert v2_container == v1_container
    assert v2_container["command"] == ENTRYPOINT
    repository, tag = v2_container["image"].rsplit(":", 1)
    assert (repository, tag) == (IMAGE_REPOSITORY, VERSION)


def test_manifest_failure_handling_is_the_builders(rendered):
    runtime = one(rendered["4node"], "TrainingRuntime")
    job_spec, jobset_policy = trainjob.failure_handling(max_restarts=3)
    node_job = trainjob.node_job(runtime)
    assert {k: node_job[k] for k in job_spec} == job_spec
    assert runtime["spec"]["template"]["spec"]["failurePolicy"] == jobset_policy
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}


def test_runtime_has_the_shape_of_the_shipped_torch_runtime():
    """Replicated job and container `node`, ancestor label `trainer`: what the torch plugin and
    the TrainJob's trainer fields target, as in the torch-distributed runtime of v2.3.0."""
    shipped = yaml.safe_load((TRAINER_SCHEMAS / "torch_distributed.yaml").read_text())
    ours, _ = seed_run(1, 1)
    for runtime in (shipped, ours):
        (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        assert rjob["name"] == trainjob.NODE
        assert rjob["template"]["metadata"]["labels"] == {trainjob.ANCESTOR_LABEL: "trainer"}
        names = [c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]]
        assert names == [trainjob.NODE]
        assert runtime["metadata"]["labels"][trainjob.FRAMEWORK_LABEL] == "torch"
        assert "torch" in runtime["spec"]["mlPolicy"]


# ---------------------------------------------------------------------------------- builder
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_built_run_validates_and_the_trainer_accepts_its_args(nodes, gpus):
    from pirl import config

    runtime, job = seed_run(nodes, gpus)
    for obj in (runtime, job):
        assert trainer_v2_errors(obj) == [], obj["kind"]
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, gpus)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert trainer["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}]
    assert job["spec"]["activeDeadlineSeconds"] == 604800
    cfg, _ = config.load(trainer["args"][2:], world_size=nodes * gpus)
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE) == (nodes, gpus)
    assert cfg.OPTIMIZER.num_epochs == 200  # the user's override wins
    node = trainjob.node_container(runtime)
    assert node["command"] == pytorchjob.COMMAND
    assert {"secretRef": {"name": "pirl-s3-credentials", "optional": True}} in node["envFrom"]
    pod = node_pod(runtime)["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    for obj in (runtime, job):
        assert obj["metadata"]["ownerReferences"][0]["name"] == "launcher"


def test_built_pod_is_the_pytorchjobs_pod():
    """One pod spec for both backends (pipeline/podspec.py)."""
    runtime, job = seed_run(4, 8)
    kwargs = dict(
        name="pirl-x",
        namespace="team-a",
        image=f"{IMAGE_REPOSITORY}:{VERSION}",
        args=[],
        num_nodes=4,
        nproc_per_node=8,
        gpus_per_node=8,
        shm_size="64Gi",
        secret_name="pirl-s3-credentials",
        config_map_name="pirl-storage",
        node_selector={"nvidia.com/gpu.present": "true"},
    )
    v1_pod = pytorchjob.build_pytorchjob(job_spec(**kwargs))["spec"]["pytorchReplicaSpecs"][
        "Master"
    ]
    v1_spec = copy.deepcopy(v1_pod["template"]["spec"])
    v2_spec = copy.deepcopy(node_pod(runtime)["spec"])
    (v1_container,) = v1_spec.pop("containers")
    (v2_container,) = v2_spec.pop("containers")
    assert v2_spec.pop("restartPolicy") == "Never"
    assert v1_spec == v2_spec
    for key in ("name", "args", "ports", "resources", "env"):
        v1_container.pop(key, None)
        v2_container.pop(key, None)
    assert v1_container == v2_container


def test_failure_policy_fails_at_once_on_the_permanent_exit_codes():
    permanent = (errors.EXIT_CONFIG, errors.EXIT_DATA, errors.EXIT_DIVERGED, errors.EXIT_STORAGE)
    job_spec, jobset_policy = trainjob.failure_handling(max_restarts=5)
    (rule,) = job_spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {
        "containerName": "node",
        "operator": "In",
        "values": list(permanent),
    }
    assert job_spec["backoffLimit"] == 0
    assert jobset_policy["maxRestarts"] == 5
    (fail_at_once,) = jobset_policy["rules"]
    assert fail_at_once["action"] == "FailJobSet"
    assert fail_at_once["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert errors.EXIT_RETRYABLE not in rule["onExitCodes"]["values"]


def test_plugin_env_is_reserved():
    assert list(trainjob.TORCH_PLUGIN_ENV) == PLUGIN_ENV
    assert trainjob.MASTER_PORT == 29400
    assert trainjob.master_addr("pirl-x") == "pirl-x-node-0-0.pirl-x"
    with pytest.raises(ValueError, match="PET_NNODES"):
        trainjob.build_trainjob(
            job_spec(name="ok", image="i", args=[], env={"PET_NNODES": "2"}), runtime_name="pirl"
        )


def test_schema_check_catches_typos():
    runtime, job = seed_run(1, 1)
    job["spec"]["trainer"]["numProcsPerNode"] = 1
    job["spec"]["runtimeRef"]["kind"] = "Runtime"
    node_job = trainjob.node_job(runtime)
    node_job["podFailurePolicy"]["rules"][0]["onExitCode"] = {}
    node_job["template"]["spec"]["restartPolicy"] = "OnFailure"
    runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestart"] = 3
    text = "\n".join(trainer_v2_errors(job) + trainer_v2_errors(runtime))
    for typo in (
        "numProcsPerNode",
        "'Runtime'",
        "onExitCode",
        "maxRestart",
        "restartPolicy: Never",
    ):
        assert typo in text, text


def test_builder_rejects_bad_input():
    with pytest.raises(ValueError, match="DNS-1035"):
        trainjob.build_run(job_spec(name="Bad_Name", namespace="", image="i", args=[]))
    with pytest.raises(ValueError, match="share"):
        trainjob.build_run(
            job_spec(name="ok", namespace="", image="i", args=[], nproc_per_node=8, gpus_per_node=4)
        )
    with pytest.raises(ValueError, match="image"):
        trainjob.build_run(job_spec(name="ok", namespace="", image="", args=[]))


QUEUED = dict(
    queue_name="pirl-gpu",
    priority_class="training-high",
    image_pull_secrets=["regcred"],
    affinity={
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "pirl-q"}},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    },
    guaranteed_qos=True,
    cpu_request="64",
    cpu_limit="90",
    memory_request="400Gi",
    memory_limit="600Gi",
    gpus_per_node=8,
    nproc_per_node=8,
    num_nodes=4,
)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_queue_priority_pull_secrets_affinity_and_guaranteed_qos(backend):
    """The Kueue label on the job object only (Kueue admits the job, not its pods one by one);
    priority class, pull Secrets and affinity on every training pod; requests = limits."""
    from pipeline import steps

    from .k8s_helpers import validate_pod_template

    spec = job_spec(name="pirl-q", namespace="team-a", image="img", args=[], **QUEUED)
    runtime, job = steps.build_job(backend, spec)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "pirl-gpu"
    if backend == "pytorchjob":
        templates = [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
        (container,) = templates[0]["spec"]["containers"]
        resources = container["resources"]
    else:
        assert trainer_v2_errors(job) == [] and trainer_v2_errors(runtime) == []
        assert "kueue.x-k8s.io/queue-name" not in runtime["metadata"]["labels"]
        templates = [node_pod(runtime)]
        resources = job["spec"]["trainer"]["resourcesPerNode"]
    for template in templates:
        validate_pod_template(template)
        assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]
        pod = template["spec"]
        assert pod["priorityClassName"] == "training-high"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["affinity"] == QUEUED["affinity"]
    assert resources["requests"] == resources["limits"]
    assert resources["requests"] == {"cpu": "90", "memory": "600Gi", "nvidia.com/gpu": "8"}


def test_scheduling_settings_are_checked():
    with pytest.raises(ValueError, match="guaranteed_qos requests exactly the limits"):
        job_spec(name="j", image="i", args=[], guaranteed_qos=True, cpu_request="1")
    with pytest.raises(ValueError, match="affinity must be"):
        job_spec(name="j", image="i", args=[], affinity={"nodeAfinity": {}})
    with pytest.raises(ValueError, match="image_pull_secrets must be a list of Secret names"):
        job_spec(name="j", image="i", args=[], image_pull_secrets="regcred")
    # none of them set: nothing of them in the job
    job = pytorchjob.build_pytorchjob(job_spec(name="j", image="i", args=[]))
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert not {"priorityClassName", "imagePullSecrets", "affinity"} & set(pod)
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
