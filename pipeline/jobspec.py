"""The training job as plain data: what both builders (`pytorchjob`, `trainjob`) and both
launchers take. Pure, no I/O.

A `JobSpec` is the job's identity (name, namespace, image, command, arguments, environment) plus
four groups of settings:
- `Resources`: pods, processes and GPUs per pod, CPU/memory requests and limits, /dev/shm;
- `Scheduling`: where and when the pods may run (node selector, tolerations, affinity, priority
  class, a Kueue queue, image pull Secrets, service account);
- `RunPolicy`: how the job ends and what happens to it then (deadline, pod cleanup, deletion,
  restart policy, retry bounds);
- `StorageRefs`: the Secret and ConfigMap whose keys become the pods' environment.

Most group fields are run parameters of the pipeline, `train_<field>` unless the field's metadata
names another (`run_parameter`) or says it is none (`run_parameter=None`); `run_parameters()`
lists that mapping and a test checks it against the pipeline's signature and its README table.
`job_spec(**fields)` builds a JobSpec from flat keywords, as the pipeline's train step gets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

CLEAN_POD_POLICIES = ("None", "Running", "All")  # PyTorchJob only
RESTART_POLICIES = ("ExitCode", "OnFailure", "Never", "Always")  # PyTorchJob only
DELETE_POLICIES = ("always", "on_success", "never")  # what the launcher does with an ended job
NULLABLE = {"command", "owner", "backoff_limit", "ttl_seconds_after_finished"}
AFFINITY_KINDS = ("nodeAffinity", "podAffinity", "podAntiAffinity")
NOT_A_RUN_PARAMETER = {"run_parameter": None}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # on the job object: Kueue admits the job as a whole


def check_size(num_nodes: int, nproc_per_node: int, gpus_per_node: int) -> None:
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


def _storage(name: str) -> dict:
    return {"run_parameter": name}


@dataclass(frozen=True)
class Resources:
    num_nodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    cpu_request: str = ""
    cpu_limit: str = ""
    memory_request: str = ""
    memory_limit: str = ""
    shm_size: str = ""
    # Guaranteed QoS: the CPU and memory requests are the limits (both must be set)
    guaranteed_qos: bool = False

    def __post_init__(self):
        check_size(self.num_nodes, self.nproc_per_node, self.gpus_per_node)
        if self.guaranteed_qos and not (self.cpu_limit and self.memory_limit):
            raise ValueError(
                "guaranteed_qos requests exactly the limits: set cpu_limit and memory_limit "
                f"(got {self.cpu_limit!r}, {self.memory_limit!r})"
            )

    def requests(self) -> tuple[str, str]:
        """(cpu, memory) requests: the limits under guaranteed_qos."""
        if self.guaranteed_qos:
            return self.cpu_limit, self.memory_limit
        return self.cpu_request, self.memory_request


@dataclass(frozen=True)
class Scheduling:
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    affinity: dict = field(default_factory=dict)
    priority_class: str = ""
    queue_name: str = ""  # Kueue LocalQueue: the job waits, suspended, until admitted whole
    image_pull_secrets: list = field(default_factory=list)
    service_account: str = ""

    def __post_init__(self):
        if not isinstance(self.affinity, dict) or not set(self.affinity) <= set(AFFINITY_KINDS):
            raise ValueError(
                f"affinity must be a Kubernetes affinity with keys among {AFFINITY_KINDS}, "
                f"got {self.affinity!r}"
            )
        secrets = self.image_pull_secrets
        if not isinstance(secrets, list) or not all(isinstance(s, str) and s for s in secrets):
            raise ValueError(f"image_pull_secrets must be a list of Secret names, got {secrets!r}")


@dataclass(frozen=True)
class RunPolicy:
    active_deadline_seconds: int = 0  # 0: none
    clean_pod_policy: str = "Running"
    delete_job: str = "on_success"
    restart_policy: str = field(default="ExitCode", metadata=NOT_A_RUN_PARAMETER)
    backoff_limit: int | None = field(default=10, metadata=NOT_A_RUN_PARAMETER)
    ttl_seconds_after_finished: int | None = field(default=None, metadata=NOT_A_RUN_PARAMETER)
    max_restarts: int = field(default=3, metadata=NOT_A_RUN_PARAMETER)  # TrainJob only

    def __post_init__(self):
        for name, value, choices in (
            ("clean_pod_policy", self.clean_pod_policy, CLEAN_POD_POLICIES),
            ("restart_policy", self.restart_policy, RESTART_POLICIES),
            ("delete_job", self.delete_job, DELETE_POLICIES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class StorageRefs:
    """Names of the storage Secret and ConfigMap; "" leaves the reference out."""

    secret_name: str = field(default="", metadata=_storage("data_storage_secret"))
    config_map_name: str = field(default="", metadata=_storage("data_storage_config_map"))


GROUPS = {
    "resources": Resources,
    "scheduling": Scheduling,
    "run_policy": RunPolicy,
    "storage": StorageRefs,
}


@dataclass(frozen=True)
class JobSpec:
    name: str
    image: str
    args: list
    namespace: str = ""
    command: list | None = None  # None: podspec.COMMAND
    env: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    scheduling: Scheduling = field(default_factory=Scheduling)
    run_policy: RunPolicy = field(default_factory=RunPolicy)
    storage: StorageRefs = field(default_factory=StorageRefs)
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    owner: dict | None = None  # an ownerReference: the job is garbage-collected with it
    image_pull_policy: str = "IfNotPresent"

    def __post_init__(self):
        if not self.image:
            raise ValueError("image is required")


def group_of() -> dict[str, str]:
    """Every group field's name -> its group's name in JobSpec."""
    return {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}


def job_spec(**flat) -> JobSpec:
    """A JobSpec from flat keywords: JobSpec's own fields and any group field by its name
    (None stands for the default, except where None is a value)."""
    flat = {k: v for k, v in flat.items() if v is not None or k in NULLABLE}
    owners = group_of()
    unknown = sorted(set(flat) - set(owners) - {f.name for f in fields(JobSpec)} - set(GROUPS))
    if unknown:
        raise TypeError(f"job_spec() got unknown settings {unknown}")
    grouped: dict[str, dict] = {group: {} for group in GROUPS}
    for key in [k for k in flat if k in owners]:
        grouped[owners[key]][key] = flat.pop(key)
    for group, cls in GROUPS.items():
        if group in flat and grouped[group]:
            raise TypeError(f"job_spec() got {group}= and its fields {sorted(grouped[group])}")
        flat.setdefault(group, cls(**grouped[group]))
    return JobSpec(**flat)


def run_parameters() -> dict[str, str]:
    """Pipeline run parameter -> the group field it sets, for every field that has one."""
    out = {}
    for cls in GROUPS.values():
        for f in fields(cls):
            param = f.metadata.get("run_parameter", f"train_{f.name}")
            if param is not None:
                out[param] = f.name
    return out


def component_inputs(run_params: dict) -> dict:
    """The train component's job-setting inputs, by field name, from the pipeline's run
    parameters (a dict of the pipeline function's arguments)."""
    return {name: run_params[param] for param, name in run_parameters().items()}
