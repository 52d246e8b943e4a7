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
- The settings are one `jobspec.JobSpec`; the pod itself (storage Secret/ConfigMap, /dev/shm, security settings, Istio opt-out) is
  `podspec`'s, the same as a TrainJob's (`trainjob`).
"""

from __future__ import annotations

from kubeflow.training import models as kf
from kubernetes import client as k8s

from pipeline.jobspec import QUEUE_LABEL, JobSpec
from pipeline.podspec import (  # noqa: F401 (COMMAND, RUN_AS_USER, job_name, trainer_args: the API)
    COMMAND,
    RUN_AS_USER,
    check_name,
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


def build_pytorchjob(job: JobSpec) -> dict:
    """The PyTorchJob of `job` as a dict (camelCase JSON, ready for the API or
    `yaml.safe_dump`): `num_nodes` pods (Master + num_nodes-1 Workers), each running
    `nproc_per_node` processes on `gpus_per_node` GPUs. Empty values leave a field unset. With a
    Kueue queue the job carries its label (Kueue suspends it until the whole job is admitted)."""
    check_name(job.name)
    res, policy = job.resources, job.run_policy
    pod_labels = labels(job.labels)
    trainer = container(
        name=CONTAINER,
        image=job.image,
        command=job.command,
        args=job.args,
        env=job.env,
        storage=job.storage,
        resource_requirements=resources(res),
        shm_size=res.shm_size,
        ports=[{"name": "pytorchjob-port", "container_port": PORT}],
        image_pull_policy=job.image_pull_policy,
    )
    template = {
        "metadata": pod_metadata(pod_labels, job.annotations),
        "spec": pod_spec([trainer], job),
    }

    def replica(replicas: int) -> kf.KubeflowOrgV1ReplicaSpec:
        return kf.KubeflowOrgV1ReplicaSpec(
            replicas=replicas, restart_policy=policy.restart_policy, template=template
        )

    replicas = {"Master": replica(1)}
    if res.num_nodes > 1:
        replicas["Worker"] = replica(res.num_nodes - 1)

    queue = {QUEUE_LABEL: job.scheduling.queue_name} if job.scheduling.queue_name else {}
    pytorchjob = kf.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=object_metadata(job.name, job.namespace, {**pod_labels, **queue}, job.owner),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=replicas,
            nproc_per_node=str(res.nproc_per_node),
            run_policy=kf.KubeflowOrgV1RunPolicy(
                clean_pod_policy=policy.clean_pod_policy,
                active_deadline_seconds=policy.active_deadline_seconds or None,
                backoff_limit=policy.backoff_limit,
                ttl_seconds_after_finished=policy.ttl_seconds_after_finished,
            ),
        ),
    )
    return k8s.ApiClient().sanitize_for_serialization(pytorchjob)


def replica_count(job: dict) -> int:
    return sum(int(r.get("replicas", 1)) for r in job["spec"]["pytorchReplicaSpecs"].values())
