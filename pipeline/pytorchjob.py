"""Build the PyTorchJob (`kubeflow.org/v1`, Training Operator v1.9) that pretrains: a pure function.

One spec serves both launchers: `launcher` submits it to a cluster, `local_runner` runs it as local
processes. Choices encoded here (see ../shared/spec/kubeflow.md §3-§4 for the operator's side):
- Master (replicas: 1, explicit: the webhook rejects a missing value) + `num_nodes - 1` Workers,
  every pod running the same command; the operator injects MASTER_ADDR/PORT, WORLD_SIZE, RANK and
  PET_NNODES/PET_NODE_RANK/PET_NPROC_PER_NODE, which torchrun reads as its flag defaults.
- The command is `python -m pipeline.torchrun` (torchrun that keeps the worker's exit code) so
  `restartPolicy: ExitCode` works: 1-127 permanent (job Failed), >=128 retryable (pod recreated,
  the trainer resumes from its newest checkpoint). `activeDeadlineSeconds` bounds the retries
  (the operator does not enforce backoffLimit for ExitCode).
- `sidecar.istio.io/inject: "false"` as annotation and label (Envoy breaks the rendezvous).
- Storage settings come from a ConfigMap and credentials from a Secret, both through `envFrom`
  (every key becomes a variable: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY), as in manifests/base; never from a parameter value.
- /dev/shm is a memory emptyDir (DataLoader workers pass batches through it); non-root pods.
"""

from __future__ import annotations

import re

from kubeflow.training import models as kf
from kubernetes import client as k8s

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator reads exit codes and the SDK reads logs of this name only
PORT = 23456  # the operator's default `pytorchjob-port`
COMMAND = ["python", "-m", "pipeline.torchrun"]
RESTART_POLICIES = ("ExitCode", "OnFailure", "Never", "Always")
CLEAN_POD_POLICIES = ("None", "Running", "All")
GPU_RESOURCE = "nvidia.com/gpu"
# SIGTERM grace: the longest step (seconds on GPU) + torchrun's 30 s shutdown + margin
TERMINATION_GRACE_SECONDS = 120
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
RUN_AS_USER = 1000  # must match the USER of the image built from images/Dockerfile
MAX_NAME = 50  # DNS-1035 allows 63; the operator's per-pod names add "-worker-<i>"
ISTIO_INJECT = "sidecar.istio.io/inject"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def job_name(prefix: str, unique: str) -> str:
    """A DNS-1035 job name `<prefix>-<unique>` of at most MAX_NAME characters (stable for a run:
    a retried launcher finds the job it created instead of starting a second one)."""
    raw = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{unique}".lower())
    name = re.sub(r"-+", "-", raw).strip("-")[:MAX_NAME].rstrip("-")
    if not name or not name[0].isalpha():
        name = f"j-{name}"[:MAX_NAME].rstrip("-")
    return name


def trainer_args(
    config: str,
    *,
    num_nodes: int,
    nproc_per_node: int,
    dataset_url: str,
    checkpoint_dir: str,
    data_source: str = "shards",
    gpus_per_node: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """torchrun arguments after the command: `-m pirl.train config=<preset> <overrides>`.

    nnodes, node rank, master address/port and nproc-per-node come from the operator's PET_*
    variables, so the same arguments run on any number of pods. The user's `overrides` come last
    and win over the values set here.
    """
    args = [
        "-m",
        "pirl.train",
        f"config={config}",
        f"config.DISTRIBUTED.NUM_NODES={num_nodes}",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={nproc_per_node}",
        f"config.DATA.TRAIN.DATA_SOURCES=[{data_source}]",
        f"config.DATA.TRAIN.DATA_PATHS=[{dataset_url}]",
        f"config.CHECKPOINT.DIR={checkpoint_dir}",
    ]
    if gpus_per_node > 0:
        # Fail fast (ConfigError, permanent) if the pod sees no GPU, rather than train on the CPU.
        args.append("config.MACHINE.DEVICE=gpu")
    return args + [str(o) for o in overrides]


def _resources(cpu_request, cpu_limit, memory_request, memory_limit, gpus) -> dict:
    requests = {k: v for k, v in (("cpu", cpu_request), ("memory", memory_request)) if v}
    limits = {k: v for k, v in (("cpu", cpu_limit), ("memory", memory_limit)) if v}
    if gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    return {"requests": requests or None, "limits": limits or None}


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
    if not NAME_RE.match(name) or len(name) > MAX_NAME:
        raise ValueError(
            f"job name {name!r} must be a DNS-1035 label (lowercase letters, digits, '-', starting "
            f"with a letter) of at most {MAX_NAME} characters; use job_name()"
        )
    if num_nodes < 1 or nproc_per_node < 1 or gpus_per_node < 0:
        raise ValueError(
            f"need num_nodes >= 1, nproc_per_node >= 1, gpus_per_node >= 0; got "
            f"{num_nodes}, {nproc_per_node}, {gpus_per_node}"
        )
    if gpus_per_node and nproc_per_node > gpus_per_node:
        raise ValueError(
            f"nproc_per_node={nproc_per_node} processes would share {gpus_per_node} GPU(s) per "
            "node; use at most one process per GPU"
        )
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

    meta_labels = {
        "app.kubernetes.io/name": "pirl",
        "app.kubernetes.io/component": "pretrain",
        **(labels or {}),
    }
    pod_labels = {**meta_labels, ISTIO_INJECT: "false"}
    pod_annotations = {**(annotations or {}), ISTIO_INJECT: "false"}

    volumes, mounts = [], []
    if shm_size:
        volumes.append(
            k8s.V1Volume(
                name="dshm",
                empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_size),
            )
        )
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))

    # Optional: a run without static credentials (IAM roles, workload identity) still starts.
    env_from = []
    if config_map_name:
        env_from.append(
            k8s.V1EnvFromSource(
                config_map_ref=k8s.V1ConfigMapEnvSource(name=config_map_name, optional=True)
            )
        )
    if secret_name:
        env_from.append(
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret_name, optional=True))
        )
    container = k8s.V1Container(
        name=CONTAINER,
        image=image,
        image_pull_policy=image_pull_policy,
        command=list(command or COMMAND),
        args=[str(a) for a in args],
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in sorted((env or {}).items())] or None,
        env_from=env_from or None,
        ports=[k8s.V1ContainerPort(name="pytorchjob-port", container_port=PORT)],
        resources=k8s.V1ResourceRequirements(
            **_resources(cpu_request, cpu_limit, memory_request, memory_limit, gpus_per_node)
        ),
        volume_mounts=mounts or None,
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            run_as_non_root=True,
        ),
    )
    tolerations = [dict(t) for t in tolerations or []]
    if gpus_per_node and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))  # GPU nodes are commonly tainted nvidia.com/gpu
    pod_spec = k8s.V1PodSpec(
        containers=[container],
        volumes=volumes or None,
        node_selector=dict(node_selector) if node_selector else None,
        tolerations=tolerations or None,
        service_account_name=service_account or None,
        # The trainer never talks to the API server; a named service account (workload identity
        # for gs:// or s3://) gets its cloud token through its own projected volume.
        automount_service_account_token=False,
        # SIGTERM stops every rank after the step in flight, then torchrun takes up to 30 s to
        # shut down: Kubernetes' default 30 s would SIGKILL mid-way (docs/failure-handling.md).
        termination_grace_period_seconds=TERMINATION_GRACE_SECONDS,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=RUN_AS_USER,
            run_as_group=RUN_AS_USER,
            fs_group=RUN_AS_USER,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )

    def replica(replicas: int) -> kf.KubeflowOrgV1ReplicaSpec:
        return kf.KubeflowOrgV1ReplicaSpec(
            replicas=replicas,
            restart_policy=restart_policy,
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=pod_labels, annotations=pod_annotations),
                spec=pod_spec,
            ),
        )

    replicas = {"Master": replica(1)}
    if num_nodes > 1:
        replicas["Worker"] = replica(num_nodes - 1)

    job = kf.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=namespace or None,
            labels=meta_labels,
            owner_references=[owner] if owner else None,
        ),
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


def replica_count(job: dict) -> int:
    return sum(int(r.get("replicas", 1)) for r in job["spec"]["pytorchReplicaSpecs"].values())
