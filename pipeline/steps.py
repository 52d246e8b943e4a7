"""What each pipeline step does, as plain functions (the KFP components in `components` are thin
wrappers over these, so they can be tested and reused without KFP).

Artifacts are duck-typed: anything with `.path` (a local file the step writes) and `.metadata`
(a dict) works, e.g. a KFP `Output[Dataset]` or a `types.SimpleNamespace`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable

from pirl import storage

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LAUNCHERS = ("auto", "cluster", "local")
BACKENDS = (
    "pytorchjob",
    "trainjob",
)  # Training Operator v1 PyTorchJob, Kubeflow Trainer v2 TrainJob
QUEUE_WAIT_SECONDS = 7 * 86400  # how long a queued job may wait for Kueue to admit it
NOT_METRICS = ("config", "schema_version")  # metrics.json parts that are settings, not results


class StepError(RuntimeError):
    """A step failed; the message says which command and how."""


def run_command(args: list[str], what: str, nproc: int = 1) -> None:
    """Run `python -m pirl <args>` with its output in the step's log; StepError on failure.
    With nproc > 1: `torchrun --standalone --nproc-per-node <nproc> -m pirl <args>`."""
    cmd = [sys.executable, "-m", "pirl", *args]
    if nproc > 1:
        torchrun = ["-m", "pipeline.torchrun", "--standalone", f"--nproc-per-node={nproc}"]
        cmd = [sys.executable, *torchrun, "-m", "pirl", *args]
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise StepError(f"{what} failed with exit code {rc}: {' '.join(cmd)}")


def copy_url(src: str, dst_path: str) -> None:
    """Copy an fsspec URL (or path) to a local file, streaming."""
    fs, path = storage.fs_and_path(src)
    os.makedirs(os.path.dirname(os.path.abspath(dst_path)), exist_ok=True)
    size = storage.retry(f"checking {src}", lambda: fs.size(path))

    def copy() -> None:
        with fs.open(path, "rb") as fin, open(dst_path, "wb") as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)

    storage.retry(f"copying {src}", copy, nbytes=size or 0)


def flatten_numbers(data, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of nested dicts by dotted name (lists and booleans skipped)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten_numbers(value, f"{prefix}{key}."))
    elif isinstance(data, int | float) and not isinstance(data, bool):
        out[prefix.rstrip(".")] = float(data)
    return out


# ------------------------------------------------------------------------------------ prep
def manifest_summary(manifest: dict, url: str) -> dict:
    """The dataset's manifest in a few scalars, for the Dataset artifact's metadata."""
    summary: dict = {"url": url, "format": manifest.get("format", "")}
    if "source" in manifest:
        summary["source"] = manifest["source"]
    classes = manifest.get("classes")
    for split, info in (manifest.get("splits") or {}).items():
        if not isinstance(info, dict):
            continue
        summary[f"{split}_num_samples"] = int(info.get("num_samples", 0))
        shards = info.get("shards", [])
        summary[f"{split}_num_shards"] = shards if isinstance(shards, int) else len(shards)
        classes = classes or info.get("classes")
    if classes is not None:
        summary["num_classes"] = len(classes)
    return summary


def prep(
    source: str,
    dest: str,
    dataset,
    *,
    shard_size: int = 0,
    resize: int = 0,
    workers: int = 0,
    val_fraction: float = 0.0,
    reuse_existing: bool = True,
) -> dict:
    """`pirl prep SOURCE DEST`; the Dataset artifact gets the manifest (file) and its summary.

    With `reuse_existing` a DEST that already has a manifest.json is used as is (prep itself also
    reuses every finished shard, so a rerun of an interrupted prep resumes).
    """
    manifest_url = storage.join(dest, "manifest.json")
    if reuse_existing and storage.exists(manifest_url):
        print(f"{manifest_url} exists: reusing the dataset (data_reuse_existing=True)", flush=True)
    else:
        args = ["prep", source, dest]
        for flag, value in (
            ("--shard-size", shard_size),
            ("--resize", resize),
            ("--workers", workers),
            ("--val-fraction", val_fraction),
        ):
            if value:
                args += [flag, str(value)]
        run_command(args, "pirl prep")
    raw = storage.read_bytes(manifest_url)
    summary = manifest_summary(json.loads(raw), dest)
    with open(dataset.path, "wb") as f:
        f.write(raw)
    dataset.metadata.update(summary)
    print(f"dataset {dest}: {json.dumps(summary)}", flush=True)
    return summary


# ------------------------------------------------------------------------------------ train
def in_cluster() -> bool:
    return os.path.exists(os.path.join(SA_DIR, "token"))


def pod_namespace() -> str:
    try:
        with open(os.path.join(SA_DIR, "namespace")) as f:
            return f.read().strip()
    except OSError:
        return ""


def training_summary(records: Iterable[dict]) -> dict[str, float]:
    """Scalars for the KFP Metrics artifact from metrics.jsonl's records."""
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "epoch_loss" in r]
    out: dict[str, float] = {}
    if steps:
        out["final_loss"] = float(steps[-1]["loss"])
        out["global_steps"] = float(max(r.get("global_step", 0) for r in steps))
        tail = [r["images_per_sec"] for r in steps[-10:] if "images_per_sec" in r]
        if tail:
            out["images_per_sec"] = sum(tail) / len(tail)
    if epochs:
        out["epochs"] = float(len(epochs))
        out["first_epoch_loss"] = float(epochs[0]["epoch_loss"])
        out["final_epoch_loss"] = float(epochs[-1]["epoch_loss"])
        seconds = [r["epoch_seconds"] for r in epochs if "epoch_seconds" in r]
        if seconds:
            out["train_hours"] = sum(seconds) / 3600.0
    return out


def read_jsonl(url: str) -> list[dict]:
    records = []
    for line in storage.read_bytes(url).decode().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# Variables the operator, torchrun and the storage Secret/ConfigMap set: `train_env` may not
# override them (a redirected endpoint would receive the credentials; LD_PRELOAD runs code).
RESERVED_ENV_PREFIXES = ("PET_", "MASTER_", "TORCHELASTIC_", "LD_", "PYTHON")
RESERVED_ENV_NAMES = {
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TOLERATION_FIELDS = {"key", "operator", "value", "effect", "tolerationSeconds"}
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


def check_pod_settings(env: dict | None, node_selector: dict | None, tolerations: list | None):
    """Refuse what the train step's pod-level parameters must not carry, before anything is
    submitted: reserved or malformed environment names, non-string node selectors, tolerations
    that are not Kubernetes tolerations."""
    for name in env or {}:
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise StepError(f"train_env: {name!r} is not an environment variable name")
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise StepError(
                f"train_env: {name} is set by the operator, torchrun or the storage Secret and "
                "ConfigMap; it cannot be overridden"
            )
    if not isinstance(node_selector or {}, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in (node_selector or {}).items()
    ):
        raise StepError(
            f"train_node_selector must map label names to strings, got {node_selector!r}"
        )
    if not isinstance(tolerations or [], list):
        raise StepError(f"train_tolerations must be a list of tolerations, got {tolerations!r}")
    for i, t in enumerate(tolerations or []):
        problem = None
        if not isinstance(t, dict) or not set(t) <= TOLERATION_FIELDS:
            problem = f"fields must be among {sorted(TOLERATION_FIELDS)}"
        elif any(not isinstance(t.get(k, ""), str) for k in ("key", "operator", "value", "effect")):
            problem = "key, operator, value and effect must be strings"
        elif t.get("operator", "Equal") not in TOLERATION_OPERATORS:
            problem = f"operator must be one of {TOLERATION_OPERATORS}"
        elif t.get("effect", "") not in TOLERATION_EFFECTS:
            problem = f"effect must be one of {TOLERATION_EFFECTS}"
        elif type(t.get("tolerationSeconds", 0)) is not int:
            problem = "tolerationSeconds must be an integer"
        if problem:
            raise StepError(f"train_tolerations[{i}] {t!r}: {problem}")


def train(
    dataset_url: str,
    model,
    metrics,
    *,
    config: str,
    overrides: list[str],
    image: str,
    run_id: str,
    output_root: str,
    checkpoint_dir: str = "",
    namespace: str = "",
    env: dict | None = None,
    launcher: str = "auto",
    backend: str = "pytorchjob",
    default_image: str = "",
    **job_settings,
) -> dict:
    """Build the job (a PyTorchJob, or a TrainJob and its TrainingRuntime), run it on the
    cluster or locally, fill the Model and Metrics. `job_settings` are JobSpec group fields by
    name (pipeline.jobspec: resources, scheduling, run policy, storage refs); the training pods
    run `image`, or `default_image` when it is ""."""
    from pipeline import podspec

    if launcher not in LAUNCHERS:
        raise StepError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if backend not in BACKENDS:
        raise StepError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_pod_settings(env, job_settings.get("node_selector"), job_settings.get("tolerations"))
    mode = launcher if launcher != "auto" else ("cluster" if in_cluster() else "local")
    run_dir = storage.join(output_root, run_id)
    ckpt = checkpoint_dir or storage.join(run_dir, "pretrain")
    name = podspec.job_name("pirl", run_id)
    owner = None
    if mode == "cluster":
        from pipeline import launcher as cluster

        namespace = namespace or pod_namespace() or cluster.default_namespace()
        # Owned by this step's pod, so deleting the run's pods deletes the job; only within one
        # namespace (the garbage collector deletes a job whose owner is in another at once).
        owner = cluster.owner_from_env() if namespace == pod_namespace() else None
    else:
        namespace = ""
    spec = train_job_spec(
        name,
        namespace,
        image or default_image,
        dataset_url=dataset_url,
        checkpoint_dir=ckpt,
        config=config,
        overrides=overrides,
        env=env,
        owner=owner,
        job_settings=job_settings,
    )
    res = spec.resources
    t0 = time.monotonic()
    runtime, job = build_job(backend, spec)
    if mode == "cluster":
        for obj in (runtime, job):
            if obj is not None:
                print(cluster.to_yaml(obj), flush=True)
        # the job's deadline + scheduling, + its wait for admission in a Kueue queue (the
        # deadline counts from admission: Kueue keeps the job suspended until then)
        wait_timeout = (spec.run_policy.active_deadline_seconds or 14 * 86400) + 1800
        if spec.scheduling.queue_name:
            wait_timeout += QUEUE_WAIT_SECONDS
        cluster.run_job(
            job, runtime=runtime, wait_timeout=wait_timeout, delete=spec.run_policy.delete_job
        )
    else:
        run_locally(job, runtime)
    seconds = time.monotonic() - t0

    trunk_url = storage.join(ckpt, "trunk.safetensors")
    metrics_url = storage.join(ckpt, "metrics.jsonl")
    summary = training_summary(read_jsonl(metrics_url))
    summary["job_seconds"] = seconds
    for key, value in summary.items():
        metrics.log_metric(key, value)
    copy_url(trunk_url, model.path)
    model.metadata.update(
        {
            "framework": "pytorch",
            "format": "safetensors",
            "trunk_url": trunk_url,
            "trunk_pt_url": storage.join(ckpt, "trunk.pt"),
            "checkpoint_dir": ckpt,
            "metrics_url": metrics_url,
            "run_dir": run_dir,
            "config": config,
            "job_name": name,
            "launcher": mode,
            "backend": backend,
            "num_nodes": res.num_nodes,
            "nproc_per_node": res.nproc_per_node,
        }
    )
    print(f"trained trunk {trunk_url}: {json.dumps(summary)}", flush=True)
    return summary


def train_job_spec(
    name: str,
    namespace: str,
    image: str,
    *,
    dataset_url: str,
    checkpoint_dir: str,
    config: str,
    overrides: list[str],
    env: dict | None,
    owner: dict | None,
    job_settings: dict,
):
    """The training job's JobSpec: the trainer's arguments for `config` and the job's size, the
    run parameters' settings (StepError naming a bad one)."""
    from pipeline import jobspec, podspec

    try:
        spec = jobspec.job_spec(
            name=name,
            namespace=namespace,
            image=image,
            args=[],
            env={str(k): str(v) for k, v in (env or {}).items()},
            labels={"app.kubernetes.io/instance": name},
            owner=owner,
            **job_settings,
        )
    except (TypeError, ValueError) as exc:
        raise StepError(f"train step settings: {exc}") from exc
    res = spec.resources
    args = podspec.trainer_args(
        config,
        num_nodes=res.num_nodes,
        nproc_per_node=res.nproc_per_node,
        dataset_url=dataset_url,
        checkpoint_dir=checkpoint_dir,
        gpus_per_node=res.gpus_per_node,
        overrides=list(overrides),
    )
    return dataclasses.replace(spec, args=args)


def build_job(backend: str, spec) -> tuple[dict | None, dict]:
    """(TrainingRuntime or None, the job): a PyTorchJob, or a TrainJob on a runtime of its own."""
    if backend == "trainjob":
        from pipeline import trainjob

        return trainjob.build_run(spec)
    from pipeline import pytorchjob

    return None, pytorchjob.build_pytorchjob(spec)


def run_locally(job: dict, runtime: dict | None) -> None:
    """Run the job as local processes, as its operator would on a cluster."""
    if runtime is not None:
        from pipeline import local_trainjob

        local_trainjob.run_trainjob(job, runtime)
    else:
        from pipeline import local_runner

        local_runner.run_pytorchjob(job)


# ------------------------------------------------------------------------------------ benchmark
def embed_images(markdown: str, base_url: str) -> str:
    """Inline the report's relative images as data: URIs (the KFP UI shows one file)."""

    def inline(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2)
        if "://" in target or target.startswith("data:"):
            return m.group(0)
        try:
            data = storage.read_bytes(storage.join(base_url, target))
        except (FileNotFoundError, storage.StorageError):
            return m.group(0)
        mime = "image/png" if target.lower().endswith(".png") else "image/jpeg"
        return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", inline, markdown)


def benchmark(
    dataset_url: str,
    model_metadata: dict,
    model_path: str,
    metrics,
    html,
    markdown,
    *,
    config: str,
    overrides: list[str],
    baseline_random: bool = True,
    nproc: int = 1,
    output_dir: str = "",
) -> dict:
    """`pirl benchmark` on the trained trunk, in `nproc` processes (one per GPU of this pod);
    Metrics (every number of metrics.json) + the HTML and Markdown reports, plots embedded."""
    trunk = model_metadata.get("trunk_url") or model_path
    out = output_dir or storage.join(model_metadata.get("run_dir", "./runs"), "benchmark")
    args = [
        "benchmark",
        f"config={config}",
        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={trunk}",
        f"config.DATA.TRAIN.DATA_PATHS=[{dataset_url}]",
        f"config.DATA.TEST.DATA_PATHS=[{dataset_url}]",
        f"config.OUTPUT_DIR={out}",
        f"config.BASELINE_RANDOM={'true' if baseline_random else 'false'}",
        "config.DISTRIBUTED.NUM_NODES=1",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={nproc}",
    ]
    if model_metadata.get("metrics_url"):
        args.append(f"config.PRETRAIN_METRICS={model_metadata['metrics_url']}")
    run_command(args + [str(o) for o in overrides], "pirl benchmark", nproc=nproc)

    results = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    numbers = flatten_numbers({k: v for k, v in results.items() if k not in NOT_METRICS})
    for key, value in numbers.items():
        metrics.log_metric(key, value)
    for artifact, name in ((html, "report.html"), (markdown, "report.md")):
        url = storage.join(out, name)
        try:
            text = storage.read_bytes(url).decode()
        except (FileNotFoundError, storage.StorageError):
            text = f"(no {name} in {out})"
        if name.endswith(".md"):
            text = embed_images(text, out)
        with open(artifact.path, "w") as f:
            f.write(text)
        artifact.metadata.update({"url": url, "output_dir": out})
    return results
