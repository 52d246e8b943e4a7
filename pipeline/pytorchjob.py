"""Build the PyTorchJob (`kubeflow.org/v1`, Training Operator v1.9) that pretrains: a pure function.

One spec serves both launchers: `launcher` submits it to a cluster, `local_runner` runs it as local
processes. Choices encoded here:
- Master (replicas: 1, explicit: the webhook rejects a missing value) + `num_nodes - 1` Workers,
  every pod running the same command; the operator injects MASTER_ADDR/PORT, WORLD_SIZE, RANK and
  PET_NNODES/PET_NODE_RANK/PET_NPROC_PER_NODE, which torchrun reads as its flag defaults.
- The command is `python -m pipeline.torchrun` (torchrun that keeps the worker's exit code) so
  `restartPolicy: ExitCode` works: 1-127 permanent (job Failed), >=128 retryable (pod recreated,
  the trainer resumes from its newest checkpoint). `activeDeadlineSeconds` bounds the retries
  (the operator does not enforce backoffLimit for ExitCode).
- The pod itself (storage Secret/ConfigMap, /dev/shm, security settings, Istio opt-out) is
  `podspec`'s, the same as a TrainJob's (`trainjob`).
"""

from __future__ import annotations

from kubeflow.training import models as kf
from kubernetes import client as k8s

from pipeline.podspec import (  # noqa: F401 (COMMAND, RUN_AS_USER, job_name, trainer_args: the API)
    COMMAND,
    RUN_AS_USER,
    check_name,
    check_size,
    container,
    job_name,
    labels,
    object_metadata,
    pod_metadata,
    pod_spec,
    resources,
    trainer_args,
)

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator reads exit codes and the SDK reads logs of this name only
PORT = 23456  # the operator's default `pytorchjob-port`
RESTART_POLICIES = ("ExitCode", "OnFailure", "Never", "Always")
CLEAN_POD_POLICIES = ("None", "Running", "All")


def build_pytorchjob(
    *,
    name: str,
    namespace: str,
    image: str,
    args: list[str],
    num_nodes: int = 1,
    nproc_per_node: int = 1,
    gpus_per_node: int = 0,
    cpu_request: str = "",
    cpu_limit: str = "",
    memory_request: str = "",
    memory_limit: str = "",
    shm_size: str = "",
    secret_name: str = "",
    config_map_name: str = "",
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    restart_policy: str = "ExitCode",
    active_deadline_seconds: int | None = None,
    clean_pod_policy: str = "Running",
    backoff_limit: int | None = 10,
    ttl_seconds_after_finished: int | None = None,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict] | None = None,
    service_account: str = "",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    owner: dict | None = None,
    image_pull_policy: str = "IfNotPresent",
) -> dict:
    """The PyTorchJob as a dict (camelCase JSON, ready for the API or `yaml.safe_dump`).

    `num_nodes` pods (Master + num_nodes-1 Workers), each running `nproc_per_node` processes on
    `gpus_per_node` GPUs. Empty strings / None leave a field unset. `owner` is an ownerReference
    (e.g. the launcher pod), so the job is garbage-collected with it.
    """
    check_name(name)
    check_size(num_nodes, nproc_per_node, gpus_per_node)
    if restart_policy not in RESTART_POLICIES:
        raise ValueError(
            f"restart_policy must be one of {RESTART_POLICIES}, got {restart_policy!r}"
        )
    if clean_pod_policy not in CLEAN_POD_POLICIES:
        raise ValueError(
            f"clean_pod_policy must be one of {CLEAN_POD_POLICIES}, got {clean_pod_policy!r}"
        )
    if not image:
        raise ValueError("image is required")

    job_labels = _labels(labels)
    trainer = container(
        name=CONTAINER,
        image=image,
        command=command,
        args=args,
        env=env,
        secret_name=secret_name,
        config_map_name=config_map_name,
        resource_requirements=resources(
            cpu_request, cpu_limit, memory_request, memory_limit, gpus_per_node
        ),
        shm_size=shm_size,
        ports=[{"name": "pytorchjob-port", "container_port": PORT}],
        image_pull_policy=image_pull_policy,
    )
    template = {
        "metadata": pod_metadata(job_labels, annotations),
        "spec": pod_spec(
            [trainer],
            gpus_per_node=gpus_per_node,
            shm_size=shm_size,
            node_selector=node_selector,
            tolerations=tolerations,
            service_account=service_account,
        ),
    }

    def replica(replicas: int) -> kf.KubeflowOrgV1ReplicaSpec:
        return kf.KubeflowOrgV1ReplicaSpec(
            replicas=replicas, restart_policy=restart_policy, template=template
        )

    replicas = {"Master": replica(1)}
    if num_nodes > 1:
        replicas["Worker"] = replica(num_nodes - 1)

    job = kf.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=object_metadata(name, namespace, job_labels, owner),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=replicas,
            nproc_per_node=str(nproc_per_node),
            run_policy=kf.KubeflowOrgV1RunPolicy(
                clean_pod_policy=clean_pod_policy,
                active_deadline_seconds=active_deadline_seconds or None,
                backoff_limit=backoff_limit,
                ttl_seconds_after_finished=ttl_seconds_after_finished,
            ),
        ),
    )
    return k8s.ApiClient().sanitize_for_serialization(job)


_labels = labels  # the builder's `labels` argument shadows the helper


def replica_count(job: dict) -> int:
    return sum(int(r.get("replicas", 1)) for r in job["spec"]["pytorchReplicaSpecs"].values())
