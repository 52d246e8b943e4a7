"""The pipeline's three KFP v2 lightweight components: prep, train, benchmark.

Each body imports inside itself (KFP ships only the function's source to the pod) and calls one
function of `pipeline.steps`. They run on the project's image (images/Dockerfile), which already
holds `pirl`, `pipeline` and the pinned kfp: `install_kfp_package=False`, so pods need no PyPI.

IMAGE is the one place that names the image (CPU_IMAGE, its CPU build, follows it). Both are
only the defaults of run parameters: the benchmark step runs on `bench_image` (CUDA), prep and the
train step's launcher on `data_image` (the CPU build: no multi-GB CUDA pull for a 1-CPU step),
the training pods on `train_image` ("" for `bench_image`). Override the defaults when compiling,
e.g. `python -m pipeline.compile --image ghcr.io/acme/pirl:0.1.0` (or PIRL_IMAGE=... in the
environment).
"""

import os
from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

DEFAULT_IMAGE = (
    # images/build.sh's default REGISTRY/pirl:VERSION: a release tag, pushed once (images/README.md)
    "registry.example.com/ml/pirl:0.1.0"
)
IMAGE = os.environ.get("PIRL_IMAGE", DEFAULT_IMAGE)


def cpu_image(image: str) -> str:
    """The CPU build of `image` (images/build.sh --cpu tags it VERSION-cpu)."""
    return f"{image}-cpu"


CPU_IMAGE = cpu_image(IMAGE)


def prep(
    source: str,
    dest: str,
    shard_size: int,
    resize: int,
    workers: int,
    val_fraction: float,
    reuse_existing: bool,
    dataset: Output[Dataset],
):
    """Shard an image folder (`pirl prep SOURCE DEST`); the Dataset carries the URL and manifest."""
    from pipeline import steps

    steps.prep(
        source,
        dest,
        dataset,
        shard_size=shard_size,
        resize=resize,
        workers=workers,
        val_fraction=val_fraction,
        reuse_existing=reuse_existing,
    )


def train(
    dataset: Input[Dataset],
    config: str,
    overrides: list,
    image: str,
    default_image: str,
    run_id: str,
    output_root: str,
    checkpoint_dir: str,
    namespace: str,
    env: dict,
    launcher: str,
    backend: str,
    # the job's settings: the fields of pipeline.jobspec's groups (a test checks they match)
    num_nodes: int,
    nproc_per_node: int,
    gpus_per_node: int,
    cpu_request: str,
    cpu_limit: str,
    memory_request: str,
    memory_limit: str,
    shm_size: str,
    guaranteed_qos: bool,
    node_selector: dict,
    tolerations: list,
    affinity: dict,
    priority_class: str,
    queue_name: str,
    image_pull_secrets: list,
    service_account: str,
    active_deadline_seconds: int,
    clean_pod_policy: str,
    delete_job: str,
    secret_name: str,
    config_map_name: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Pretrain as a PyTorchJob or a TrainJob (on the cluster, or as local processes); Model +
    Metrics out. The training pods run `image`, or `default_image` when it is ""."""
    settings = dict(locals())  # every input above, by name
    from pipeline import steps

    dataset, model, metrics = (
        settings.pop("dataset"),
        settings.pop("model"),
        settings.pop("metrics"),
    )
    steps.train(dataset.metadata["url"], model, metrics, **settings)


def benchmark(
    dataset: Input[Dataset],
    model: Input[Model],
    config: str,
    overrides: list,
    baseline_random: bool,
    gpus: int,
    metrics: Output[Metrics],
    report: Output[HTML],
    report_md: Output[Markdown],
):
    """Linear eval + kNN of the trained trunk (`pirl benchmark`); Metrics + HTML/Markdown report."""
    from pipeline import steps

    steps.benchmark(
        dataset.metadata["url"],
        dict(model.metadata),
        model.path,
        metrics,
        report,
        report_md,
        config=config,
        overrides=overrides,
        baseline_random=baseline_random,
        nproc=max(1, gpus),
    )


def make_components(image: str = IMAGE) -> SimpleNamespace:
    """The three components (prep, train, benchmark), compiled on `image`; the pipeline sets
    each task's image from a run parameter."""

    def component(func):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return SimpleNamespace(
        prep=component(prep), train=component(train), benchmark=component(benchmark)
    )
