"""The training pod, shared by both job kinds: a PyTorchJob's replica template (`pytorchjob`) and
a TrainingRuntime's `node` template (`trainjob`) are built from these functions, so the two
backends run the same container the same way. Pure functions, no I/O.

What every training pod gets:
- the command `python -m pipeline.torchrun` (torchrun that keeps the worker's exit code, so the
  exit codes of pirl/errors.py reach the job's failure policy) and the trainer's arguments;
- storage settings from a ConfigMap and credentials from a Secret, both through `envFrom` (every
  key becomes a variable) and both optional; never a parameter value;
- /dev/shm as a memory emptyDir (DataLoader workers pass batches through it);
- non-root (the image's numeric user), no privilege escalation, no capabilities, RuntimeDefault
  seccomp, no service-account token (the trainer never talks to the API server);
- `sidecar.istio.io/inject: "false"` as annotation and label (Envoy breaks the rendezvous);
- a 120 s termination grace (a step + torchrun's 30 s shutdown), the nvidia.com/gpu toleration
  when it uses GPUs;
- the job's scheduling settings (`jobspec.Scheduling`): node selector, tolerations, affinity,
  priority class, image pull Secrets, service account.
"""

from __future__ import annotations

import re

from kubernetes import client as k8s

from pipeline.jobspec import JobSpec, Resources, StorageRefs

COMMAND = ["python", "-m", "pipeline.torchrun"]
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
RUN_AS_USER = 1000  # must match the USER of the image built from images/Dockerfile
# SIGTERM grace: the longest step (seconds on GPU) + torchrun's 30 s shutdown + margin
TERMINATION_GRACE_SECONDS = 120
ISTIO_INJECT = "sidecar.istio.io/inject"
MAX_NAME = 50  # DNS-1035 allows 63; the per-pod names add "-worker-<i>" / "-node-0-<i>-<hash>"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
BASE_LABELS = {"app.kubernetes.io/name": "pirl", "app.kubernetes.io/component": "pretrain"}


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

    nnodes, node rank, master address/port and nproc-per-node come from the PET_* variables the
    operator (v1) or the torch plugin (v2) injects, so the same arguments run on any number of
    pods under either. The user's `overrides` come last and win over the values set here.
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


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or len(name) > MAX_NAME:
        raise ValueError(
            f"job name {name!r} must be a DNS-1035 label (lowercase letters, digits, '-', starting "
            f"with a letter) of at most {MAX_NAME} characters; use job_name()"
        )


def resources(res: Resources) -> dict:
    """The training container's ResourceRequirements dict (empty values left out); GPUs are
    requested = limited, CPU and memory too under guaranteed_qos."""
    cpu_request, memory_request = res.requests()
    requests = {k: v for k, v in (("cpu", cpu_request), ("memory", memory_request)) if v}
    limits = {k: v for k, v in (("cpu", res.cpu_limit), ("memory", res.memory_limit)) if v}
    if res.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(res.gpus_per_node)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def labels(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**BASE_LABELS, **(extra or {})}


def pod_metadata(pod_labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict:
    return {
        "labels": {**pod_labels, ISTIO_INJECT: "false"},
        "annotations": {**(annotations or {}), ISTIO_INJECT: "false"},
    }


def container(
    *,
    name: str,
    image: str,
    args: list[str] | None = None,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    storage: StorageRefs | None = None,
    resource_requirements: dict | None = None,
    shm_size: str = "",
    ports: list[dict] | None = None,
    image_pull_policy: str = "IfNotPresent",
) -> dict:
    """The training container as a dict (camelCase JSON). Empty values leave a field unset."""
    # Optional: a run without static credentials (IAM roles, workload identity) still starts;
    # an empty name leaves the reference out (the API server rejects `name: ""`).
    storage = storage or StorageRefs()
    env_from = []
    if storage.config_map_name:
        env_from.append(
            k8s.V1EnvFromSource(
                config_map_ref=k8s.V1ConfigMapEnvSource(name=storage.config_map_name, optional=True)
            )
        )
    if storage.secret_name:
        env_from.append(
            k8s.V1EnvFromSource(
                secret_ref=k8s.V1SecretEnvSource(name=storage.secret_name, optional=True)
            )
        )
    model = k8s.V1Container(
        name=name,
        image=image or None,
        image_pull_policy=image_pull_policy,
        command=list(command or COMMAND),
        args=[str(a) for a in args] if args is not None else None,
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in sorted((env or {}).items())] or None,
        env_from=env_from or None,
        ports=[k8s.V1ContainerPort(**p) for p in ports or []] or None,
        resources=k8s.V1ResourceRequirements(**resource_requirements)
        if resource_requirements
        else None,
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")] if shm_size else None,
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            run_as_non_root=True,
        ),
    )
    return k8s.ApiClient().sanitize_for_serialization(model)


def pod_spec(containers: list[dict], job: JobSpec, restart_policy: str | None = None) -> dict:
    """The training pod's spec around `containers` (dicts from container())."""
    sched, shm_size = job.scheduling, job.resources.shm_size
    tolerations = [dict(t) for t in sched.tolerations]
    if job.resources.gpus_per_node and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))  # GPU nodes are commonly tainted nvidia.com/gpu
    spec = k8s.V1PodSpec(
        containers=[],
        restart_policy=restart_policy,
        volumes=[
            k8s.V1Volume(
                name="dshm",
                empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_size),
            )
        ]
        if shm_size
        else None,
        node_selector=dict(sched.node_selector) or None,
        tolerations=tolerations or None,
        priority_class_name=sched.priority_class or None,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=n) for n in sched.image_pull_secrets]
        or None,
        service_account_name=sched.service_account or None,
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
    out = k8s.ApiClient().sanitize_for_serialization(spec)
    out["containers"] = containers
    if sched.affinity:  # as given (camelCase JSON): the API server validates it
        out["affinity"] = dict(sched.affinity)
    return out


def object_metadata(
    name: str,
    namespace: str,
    object_labels: dict[str, str],
    owner: dict | None = None,
) -> dict:
    """metadata of a job object; `owner` is an ownerReference (e.g. the launcher pod), so the
    object is garbage-collected with it."""
    meta = {"name": name, "labels": dict(object_labels)}
    if namespace:
        meta["namespace"] = namespace
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    return meta
