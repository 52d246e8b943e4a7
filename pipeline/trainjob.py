"""Build a Kubeflow Trainer v2 TrainJob and the TrainingRuntime it runs on
(`trainer.kubeflow.org/v1alpha1`, Trainer v2.3): pure functions, no I/O.

The TrainingRuntime holds the pod (`podspec`'s, the same as the PyTorchJob's) and the failure
handling; the TrainJob says what to train and on how much: `trainer.numNodes`,
`numProcPerNode`, `resourcesPerNode`, `args`, `env`. The runtime's JobSet has one replicated job
and one container, both named `node` and labelled as the `trainer` step, as the shipped
`torch-distributed` runtime (tests/schemas/trainer-v2.3.0/torch_distributed.yaml): the torch
plugin then injects TORCH_PLUGIN_ENV into it, which `python -m pipeline.torchrun` reads as its
flag defaults, so the command line is the PyTorchJob's.

Failure handling, on the two levels Trainer v2 offers (where v1 has restartPolicy ExitCode and no
bound on retries):
- the `node` Job: `restartPolicy: Never`, a `podFailurePolicy` whose first rule fails the Job at
  once when the trainer exits with a permanent code (PERMANENT_EXIT_CODES: config, data,
  diverged, storage), and `backoffLimit: 0`, so any other failure (129 lost peer, 137 OOM kill,
  143 SIGTERM, 1) fails the Job too;
- the JobSet: `failurePolicy.maxRestarts` recreates every pod of a failed Job together (a
  distributed run cannot go on with one replaced pod: the survivors would lose their peer), each
  time resuming from the newest checkpoint, at most `max_restarts` times; a rule fails the JobSet
  without restarting when the Job failed through the podFailurePolicy (the permanent codes).
The TrainJob copies the JobSet's `Completed`/`Failed` condition as `Complete`/`Failed`, and
fails with reason `DeadlineExceeded` after `spec.activeDeadlineSeconds`.

Plain dicts, as the API takes them: the `kubeflow` SDK (TrainerClient) shares the `kubeflow/`
package directory with kubeflow-training and builds its own TrainJobs, and the typed models of
`kubeflow-trainer-api` would add a second model family beside the kubernetes client's for what
the tests already check strictly against the v2.3.0 CRDs (tests/schemas/).
"""

from __future__ import annotations

from pipeline.jobspec import QUEUE_LABEL, JobSpec
from pipeline.podspec import (
    check_name,
    container,
    labels,
    object_metadata,
    pod_metadata,
    pod_spec,
    resources,
)
from pirl.errors import EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, EXIT_STORAGE

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
TRAINJOB_KIND, RUNTIME_KIND = "TrainJob", "TrainingRuntime"
NODE = "node"  # the replicated job and container the torch plugin injects PET_* into
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
# What the torch plugin injects into the `node` container (and forbids in spec.trainer.env):
# PET_NODE_RANK is the pod's job-completion index, PET_MASTER_ADDR `<trainjob>-node-0-0.<trainjob>`.
TORCH_PLUGIN_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
MASTER_PORT = 29400
PERMANENT_EXIT_CODES = (EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, EXIT_STORAGE)
PERMANENT_RULE = "permanentExitCode"
# The container's own environment: the pods' logs stream line by line (v1's operator sets it).
CONTAINER_ENV = {"PYTHONUNBUFFERED": "1"}


def master_addr(trainjob_name: str) -> str:
    """The torch plugin's PET_MASTER_ADDR: node 0's hostname in the JobSet's subdomain."""
    return f"{trainjob_name}-{NODE}-0-0.{trainjob_name}"


def failure_handling(max_restarts: int, backoff_limit: int = 0) -> tuple[dict, dict]:
    """(the `node` Job's spec fields, the JobSet's failurePolicy): see the module doc."""
    if max_restarts < 0 or backoff_limit < 0:
        raise ValueError(
            f"need max_restarts >= 0 and backoff_limit >= 0, got {max_restarts}, {backoff_limit}"
        )
    job_spec = {
        "backoffLimit": backoff_limit,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": NODE,
                        "operator": "In",
                        "values": list(PERMANENT_EXIT_CODES),
                    },
                }
            ]
        },
    }
    jobset_policy = {
        "maxRestarts": max_restarts,
        "restartStrategy": "Recreate",
        "rules": [
            {
                "name": PERMANENT_RULE,
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
            }
        ],
    }
    return job_spec, jobset_policy


def build_training_runtime(job: JobSpec) -> dict:
    """A namespaced TrainingRuntime named `job.name` for pirl as a dict (camelCase JSON). Its
    `node` pod is podspec's training pod without arguments or resources (the TrainJob sets
    those), with the job's scheduling settings."""
    check_name(job.name)
    runtime_labels = {**labels(job.labels), FRAMEWORK_LABEL: "torch"}
    node = container(
        name=NODE,
        image=job.image,
        command=job.command,
        env=CONTAINER_ENV,
        storage=job.storage,
        shm_size=job.resources.shm_size,
        image_pull_policy=job.image_pull_policy,
    )
    job_failure, jobset_failure = failure_handling(job.run_policy.max_restarts)
    pod_template = {
        "metadata": pod_metadata(labels(job.labels), job.annotations),
        "spec": pod_spec([node], job, restart_policy="Never"),  # required by podFailurePolicy
    }
    return {
        "apiVersion": API_VERSION,
        "kind": RUNTIME_KIND,
        "metadata": object_metadata(job.name, job.namespace, runtime_labels, job.owner),
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": jobset_failure,
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                                "spec": {**job_failure, "template": pod_template},
                            },
                        }
                    ],
                }
            },
        },
    }


def build_trainjob(job: JobSpec, runtime_name: str = "") -> dict:
    """A TrainJob on the namespaced TrainingRuntime `runtime_name` (by default `job.name`) as a
    dict (camelCase JSON). With a Kueue queue the TrainJob carries its label."""
    check_name(job.name)
    reserved = sorted(set(job.env) & set(TORCH_PLUGIN_ENV))
    if reserved:
        raise ValueError(
            f"{reserved} are set by the Trainer's torch plugin; a TrainJob may not set them"
        )
    res = job.resources
    trainer = {
        "numNodes": res.num_nodes,
        "numProcPerNode": res.nproc_per_node,
        "args": [str(a) for a in job.args],
    }
    per_node = resources(res)
    if per_node:
        trainer["resourcesPerNode"] = per_node
    if job.env:
        trainer["env"] = [{"name": k, "value": str(v)} for k, v in sorted(job.env.items())]
    runtime_ref = {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": runtime_name or job.name}
    spec = {"runtimeRef": runtime_ref, "trainer": trainer}
    if job.run_policy.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = int(job.run_policy.active_deadline_seconds)
    queue = job.scheduling.queue_name
    job_labels = {**labels(job.labels), **({QUEUE_LABEL: queue} if queue else {})}
    return {
        "apiVersion": API_VERSION,
        "kind": TRAINJOB_KIND,
        "metadata": object_metadata(job.name, job.namespace, job_labels, job.owner),
        "spec": spec,
    }


def build_run(job: JobSpec) -> tuple[dict, dict]:
    """(TrainingRuntime, TrainJob) of one run, both named `job.name`: the pipeline's v2 job. A
    runtime of its own per run carries the run's image, Secret, ConfigMap, /dev/shm and
    scheduling settings; PyTorchJob-only settings (clean_pod_policy, restart_policy,
    backoff_limit) do not apply."""
    return build_training_runtime(job), build_trainjob(job)


def node_container(runtime: dict) -> dict:
    """The `node` container of a TrainingRuntime (ValueError when it has none)."""
    for rjob in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        if rjob["name"] == NODE:
            for c in rjob["template"]["spec"]["template"]["spec"]["containers"]:
                if c["name"] == NODE:
                    return c
    raise ValueError(
        f"TrainingRuntime {runtime['metadata']['name']}: no container {NODE!r} in job {NODE!r}"
    )


def node_job(runtime: dict) -> dict:
    """The spec of the runtime's `node` Job."""
    for rjob in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        if rjob["name"] == NODE:
            return rjob["template"]["spec"]
    raise ValueError(f"TrainingRuntime {runtime['metadata']['name']}: no replicated job {NODE!r}")
