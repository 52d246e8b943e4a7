"""The `pirl-pretrain` pipeline: prep -> train (a PyTorchJob or a TrainJob) -> benchmark.

The defaults reproduce the seed's main command, `config=pretrain/pirl/pirl_jigsaw_4node_resnet50`
on 4 nodes x 8 GPUs, on an ImageNet-style folder in S3. Run parameters are prefixed by the step
they shape (`data_`, `train_`, `bench_`) because the KFP UI lists them alphabetically and does not
show their descriptions; the descriptions are in the docstring (they land in the compiled YAML).

Storage settings (a ConfigMap: STORAGE_KEYS) and credentials (a Secret: CREDENTIAL_KEYS) are named
by run parameters and mapped into every step and every training pod; their values never pass
through a parameter. Both are optional; an empty name means none for the training pods, and for
the steps too in a build without step storage refs (`build_pipeline(step_storage_refs=False)`).

The train step's job settings are the fields of `pipeline.jobspec`'s groups: the run parameter
`train_<field>` (or the one a field names) reaches the train component's input `<field>` through
`component_inputs`, and a test checks the signature, the JobSpec and the README table agree.
"""

from kfp import dsl, kubernetes
from kfp.dsl import Markdown

from pipeline.components import IMAGE, cpu_image, make_components
from pipeline.jobspec import component_inputs

NAME = "pirl-pretrain"
# Every key of the storage ConfigMap (manifests/base/storage/configmap.yaml): the steps get the
# same settings as the training pods, which take the whole ConfigMap through envFrom.
STORAGE_KEYS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORAGE_REFS = ("pirl-s3-credentials", "pirl-storage")  # manifests/base/storage
BENCH_SHM = "32Gi"  # counts against bench_memory
LAUNCHER_POD_ANNOTATIONS = {
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",  # Cluster Autoscaler
    "karpenter.sh/do-not-disrupt": "true",  # Karpenter consolidation
}
LAUNCHER_RETRIES = 3


def _storage_env(task, secret, config_map) -> None:
    kubernetes.use_secret_as_env(
        task, secret_name=secret, secret_key_to_env={k: k for k in CREDENTIAL_KEYS}, optional=True
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=config_map,
        config_map_key_to_env={k: k for k in STORAGE_KEYS},
        optional=True,
    )


def build_pipeline(
    image: str = IMAGE, small_image: str | None = None, step_storage_refs: bool = True
):
    """The `pirl-pretrain` pipeline function: `bench_image` defaults to `image`, `data_image` (prep
    and the launcher) to `small_image`, by default the CPU build of `image`.

    With `step_storage_refs` the steps take the storage Secret's and ConfigMap's keys through
    KFP's Kubernetes config, which cannot leave out a reference whose name is "" (the driver
    writes `name: ""`, which the API server rejects). Without, the steps get no reference at
    all (for pods that reach the store through their identity) and both names default to "";
    the training pods take whatever names the run gives either way ("" for none)."""
    c = make_components(image)
    small_image = small_image or cpu_image(image)
    default_secret, default_config_map = STORAGE_REFS if step_storage_refs else ("", "")

    @dsl.pipeline(name=NAME, display_name="PIRL pretraining: prep, PyTorchJob/TrainJob, benchmark")
    def pirl_pretrain(
        data_source: str = "s3://pirl/raw/imagenet1k",
        data_dataset_url: str = "s3://pirl/datasets/imagenet1k",
        data_reuse_existing: bool = True,
        data_shard_size: int = 0,
        data_resize: int = 0,
        data_workers: int = 16,
        data_val_fraction: float = 0.0,
        data_cpu: str = "16",
        data_memory: str = "32Gi",
        data_storage_secret: str = default_secret,
        data_storage_config_map: str = default_config_map,
        data_image: str = small_image,
        train_config: str = "pretrain/pirl/pirl_jigsaw_4node_resnet50",
        train_overrides: list = [],  # noqa: B006 (a KFP default, never mutated)
        train_num_nodes: int = 4,
        train_nproc_per_node: int = 8,
        train_gpus_per_node: int = 8,
        train_cpu_request: str = "64",
        train_cpu_limit: str = "90",
        train_memory_request: str = "400Gi",
        train_memory_limit: str = "600Gi",
        train_shm_size: str = "64Gi",
        train_guaranteed_qos: bool = False,
        train_image: str = "",
        train_output_root: str = "s3://pirl/runs",
        train_checkpoint_dir: str = "",
        train_namespace: str = "",
        train_env: dict = {},  # noqa: B006
        train_node_selector: dict = {},  # noqa: B006
        train_tolerations: list = [],  # noqa: B006
        train_affinity: dict = {},  # noqa: B006
        train_priority_class: str = "",
        train_queue_name: str = "",
        train_image_pull_secrets: list = [],  # noqa: B006
        train_service_account: str = "",
        train_active_deadline_seconds: int = 604800,
        train_clean_pod_policy: str = "Running",
        train_delete_job: str = "on_success",
        train_launcher: str = "auto",
        train_backend: str = "pytorchjob",
        bench_config: str = "benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear",
        bench_overrides: list = [],  # noqa: B006
        bench_baseline_random: bool = False,
        bench_gpus: int = 8,
        bench_cpu: str = "32",
        bench_memory: str = "128Gi",
        bench_image: str = image,
    ) -> Markdown:
        """PIRL/NPID self-supervised pretraining: shard the images, train on a PyTorchJob or TrainJob, benchmark.

        Args:
            data_source: Images to train on, any fsspec URL (s3://, gs://, a path): an ImageFolder tree with train/ and val/ splits (ImageNet's layout), one without splits, or a list file (see pirl.data.sources).
            data_dataset_url: Where `pirl prep` writes the sharded dataset (tar shards + manifest.json).
            data_reuse_existing: Skip prep when data_dataset_url already holds a manifest.json.
            data_shard_size: Images per shard (0: prep's default, 1000).
            data_resize: Resize the shorter side to this many pixels while sharding (0: keep the originals).
            data_workers: Parallel decode/encode processes for prep.
            data_val_fraction: Without a val/ folder in data_source, hold out this fraction of each class as the val split (the benchmark evaluates on val).
            data_cpu: CPU request of the prep step.
            data_memory: Memory request and limit of the prep step.
            data_storage_secret: Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the object store (optional; mapped into every step and training pod).
            data_storage_config_map: Kubernetes ConfigMap with AWS_ENDPOINT_URL / AWS_DEFAULT_REGION / AWS_RETRY_MODE / AWS_MAX_ATTEMPTS (optional; e.g. for MinIO).
            data_image: Image of the small steps, prep and the train step's launcher (the CPU build, images/build.sh --cpu).
            train_config: pirl.train preset (VISSL name), e.g. pretrain/pirl/pirl_jigsaw_4node_resnet50 or pretrain/npid/npid_8gpu_resnet.
            train_overrides: Extra pirl.train overrides, e.g. ["config.OPTIMIZER.num_epochs=200"]; they win over everything else.
            train_num_nodes: Training pods (nodes): a PyTorchJob's 1 Master + train_num_nodes-1 Workers, a TrainJob's trainer.numNodes.
            train_nproc_per_node: Training processes per pod (one per GPU).
            train_gpus_per_node: GPUs per pod (nvidia.com/gpu); 0 trains on CPU.
            train_cpu_request: CPU request of each training pod.
            train_cpu_limit: CPU limit of each training pod ("" for none).
            train_memory_request: Memory request of each training pod.
            train_memory_limit: Memory limit of each training pod (includes /dev/shm).
            train_shm_size: Size of the in-memory /dev/shm of each training pod ("" for the runtime's 64 MiB).
            train_guaranteed_qos: Request exactly the limits (CPU and memory requests = train_cpu_limit and train_memory_limit), so the training pods get the Guaranteed QoS class.
            train_image: Image of the training pods ("" for bench_image).
            train_output_root: Runs go to <train_output_root>/<run id>/ (pretrain/ checkpoints and trunk, benchmark/ reports).
            train_checkpoint_dir: Use this checkpoint directory instead (e.g. a previous run's .../pretrain to resume it).
            train_namespace: Namespace of the job ("" for the run's own namespace).
            train_env: Extra environment variables of the training pods, e.g. {"NCCL_DEBUG": "WARN"}.
            train_node_selector: nodeSelector of the training pods, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}.
            train_tolerations: Extra tolerations of the training pods (nvidia.com/gpu:NoSchedule is added when train_gpus_per_node > 0).
            train_affinity: Affinity of the training pods (a Kubernetes affinity, e.g. {"podAntiAffinity": ...} to spread them one per node).
            train_priority_class: PriorityClass of the training pods ("" for the cluster default); Kueue also orders its queue by it.
            train_queue_name: Kueue LocalQueue of the job ("" for none): the job waits, suspended, until Kueue admits all its pods at once (no partial placement).
            train_image_pull_secrets: Secrets the training pods pull their image with, e.g. ["regcred"].
            train_service_account: Service account of the training pods ("" for the namespace default), e.g. for workload identity.
            train_active_deadline_seconds: The job fails after this many seconds (for a PyTorchJob also the only bound on the retries of restartPolicy ExitCode).
            train_clean_pod_policy: PyTorchJob only: which pods are deleted when the job ends: None, Running or All.
            train_delete_job: Delete the job (and a TrainJob's TrainingRuntime) when the step ends: always, on_success or never.
            train_launcher: cluster (submit the job), local (run its pods as processes in the step) or auto (cluster inside a pod).
            train_backend: pytorchjob (Training Operator v1 PyTorchJob) or trainjob (Kubeflow Trainer v2 TrainJob on a TrainingRuntime of its own; retries bounded by the JobSet's maxRestarts).
            bench_config: pirl benchmark preset (linear evaluation + kNN).
            bench_overrides: Extra pirl benchmark overrides, e.g. ["config.OPTIMIZER.num_epochs=10"].
            bench_baseline_random: Also evaluate a randomly initialised trunk, for comparison.
            bench_gpus: GPUs of the benchmark step (one process each; 0 runs one process on CPU).
            bench_cpu: CPU request of the benchmark step.
            bench_memory: Memory request and limit of the benchmark step (includes its 32Gi /dev/shm).
            bench_image: Image of the benchmark step (the CUDA build); also the training pods' unless train_image is set.

        Returns:
            The benchmark's Markdown report (the accuracy table and plots).
        """
        run_parameters = dict(locals())  # this function's arguments, by name
        prep = c.prep(
            source=data_source,
            dest=data_dataset_url,
            shard_size=data_shard_size,
            resize=data_resize,
            workers=data_workers,
            val_fraction=data_val_fraction,
            reuse_existing=data_reuse_existing,
        )
        prep.set_display_name("prep: shard the dataset")
        prep.set_caching_options(False)  # prep itself reuses finished shards (data_reuse_existing)
        prep.set_cpu_request(data_cpu).set_memory_request(data_memory).set_memory_limit(data_memory)

        train = c.train(
            dataset=prep.outputs["dataset"],
            config=train_config,
            overrides=train_overrides,
            image=train_image,
            default_image=bench_image,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            output_root=train_output_root,
            checkpoint_dir=train_checkpoint_dir,
            namespace=train_namespace,
            env=train_env,
            launcher=train_launcher,
            backend=train_backend,
            **component_inputs(run_parameters),
        )
        train.set_display_name("train: PyTorchJob or TrainJob")
        train.set_caching_options(False)  # a cached step would not launch the job again
        train.set_cpu_request("1").set_memory_request("2Gi").set_memory_limit("4Gi")
        # The job's ownerReference: deleting the run's pods deletes the job too.
        kubernetes.use_field_path_as_env(train, "KFP_POD_NAME", "metadata.name")
        kubernetes.use_field_path_as_env(train, "KFP_POD_UID", "metadata.uid")
        # The 1-CPU launcher follows a job of up to 32 GPUs for days: autoscalers must not move
        # it. If it is evicted anyway (node drain), it leaves the job running and exits; the
        # retry re-attaches to the job (a Failed job is never rerun by a retry).
        for key, value in LAUNCHER_POD_ANNOTATIONS.items():
            kubernetes.add_pod_annotation(train, key, value)
        # backoff_max_duration counts from the first attempt: a retry after days must still happen
        train.set_retry(
            num_retries=LAUNCHER_RETRIES, backoff_duration="60s", backoff_max_duration="1296000s"
        )

        bench = c.benchmark(
            dataset=prep.outputs["dataset"],
            model=train.outputs["model"],
            config=bench_config,
            overrides=bench_overrides,
            baseline_random=bench_baseline_random,
            gpus=bench_gpus,
        )
        bench.set_display_name("benchmark: linear eval + kNN")
        bench.set_caching_options(False)
        bench.set_cpu_request(bench_cpu).set_memory_request(bench_memory).set_memory_limit(
            bench_memory
        )
        bench.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(bench_gpus)
        kubernetes.add_toleration(
            bench, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"
        )
        # one DataLoader per GPU process passes batches through /dev/shm (64 MiB by default)
        kubernetes.empty_dir_mount(
            bench, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=BENCH_SHM
        )

        prep.set_container_image(data_image)
        train.set_container_image(data_image)
        bench.set_container_image(bench_image)
        if step_storage_refs:
            for task in (prep, train, bench):
                _storage_env(task, data_storage_secret, data_storage_config_map)
        return bench.outputs["report_md"]

    return pirl_pretrain


pirl_pretrain = build_pipeline()
