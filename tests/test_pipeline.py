"""The compiled pipeline (KFP's own loader, not stale, parameters) and the PyTorchJob it builds
(the Training Operator's CRD schema; arguments the trainer accepts), plus the steps' helpers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline import steps
from pipeline.compile import OUTPUT, compile_pipeline
from pipeline.pytorchjob import build_pytorchjob, job_name, trainer_args

SEED_PRESET = "pretrain/pirl/pirl_jigsaw_4node_resnet50"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")


def test_committed_yaml_equals_a_fresh_compile(fresh):
    assert OUTPUT.read_text() == fresh.read_text(), (
        "pipeline/pirl_pipeline.yaml is stale: run `python -m pipeline.compile` and commit it"
    )


def test_compiled_pipeline_loads_with_kfp(fresh):
    from google.protobuf import json_format
    from kfp import components
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    loaded = components.load_component_from_file(str(fresh))
    assert loaded.name == "pirl-pretrain"
    docs = list(yaml.safe_load_all(fresh.read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    assert set(spec.root.dag.tasks) == {"prep", "train", "benchmark"}
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    assert set(executors) == {"exec-prep", "exec-train", "exec-benchmark"}
    for struct in executors.values():  # kfp-kubernetes' own message accepts each one
        json_format.ParseDict(
            json_format.MessageToDict(struct),
            kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
        )


def test_parameters_are_prefixed_described_and_default_to_the_seed_command(fresh):
    doc = next(yaml.safe_load_all(fresh.read_text()))
    params = doc["root"]["inputDefinitions"]["parameters"]
    for name, p in params.items():
        assert name.split("_")[0] in ("data", "train", "bench"), name
        assert p.get("description"), f"{name} has no description"
    assert params["train_config"]["defaultValue"] == SEED_PRESET
    assert params["train_num_nodes"]["defaultValue"] == 4
    assert params["train_nproc_per_node"]["defaultValue"] == 8
    assert params["train_gpus_per_node"]["defaultValue"] == 8


def test_steps_run_uncached_without_pip(fresh):
    docs = list(yaml.safe_load_all(fresh.read_text()))
    for task in docs[0]["root"]["dag"]["tasks"].values():
        assert not task.get("cachingOptions", {}).get("enableCache"), task["taskInfo"]
    for ex in docs[0]["deploymentSpec"]["executors"].values():
        assert "pip install" not in json.dumps(ex["container"]["command"])


def test_every_step_takes_its_image_from_a_run_parameter(fresh):
    """prep and the launcher on data_image (the CPU build), the benchmark on bench_image; the
    training pods on train_image, "" meaning bench_image."""
    from pipeline.components import CPU_IMAGE, IMAGE

    doc = next(yaml.safe_load_all(fresh.read_text()))
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert params["data_image"]["defaultValue"] == CPU_IMAGE == IMAGE + "-cpu"
    assert params["bench_image"]["defaultValue"] == IMAGE
    assert params["train_image"]["defaultValue"] == ""
    expected = {"prep": "data_image", "train": "data_image", "benchmark": "bench_image"}
    tasks = doc["root"]["dag"]["tasks"]
    for task, param in expected.items():
        executor = doc["deploymentSpec"]["executors"][f"exec-{task}"]
        channel = f"pipelinechannel--{param}"
        assert executor["container"]["image"] == f"{{{{$.inputs.parameters['{channel}']}}}}"
        assert tasks[task]["inputs"]["parameters"][channel] == {"componentInputParameter": param}
    train = tasks["train"]["inputs"]["parameters"]
    assert train["image"] == {"componentInputParameter": "train_image"}
    assert train["default_image"] == {"componentInputParameter": "bench_image"}


def test_credentials_come_from_a_secret_named_by_a_parameter(fresh):
    docs = list(yaml.safe_load_all(fresh.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for ex in executors.values():
        (secret,) = ex["secretAsEnv"]
        assert secret["secretNameParameter"] == {"componentInputParameter": "data_storage_secret"}
        assert {k["envVar"] for k in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
    assert "AKIA" not in fresh.read_text()


def test_compile_image_override(tmp_path):
    path = compile_pipeline(tmp_path / "p.yaml", image="ghcr.io/acme/pirl:9.9")
    params = next(yaml.safe_load_all(path.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert params["bench_image"]["defaultValue"] == "ghcr.io/acme/pirl:9.9"
    assert params["data_image"]["defaultValue"] == "ghcr.io/acme/pirl:9.9-cpu"
    path = compile_pipeline(tmp_path / "q.yaml", image="a/pirl:1", small_image="b/small:1")
    params = next(yaml.safe_load_all(path.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert params["data_image"]["defaultValue"] == "b/small:1"


# ------------------------------------------------------------------------------ the PyTorchJob
def crd_schema() -> dict:
    from .k8s_helpers import PYTORCHJOB_CRD

    crd = yaml.safe_load(PYTORCHJOB_CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))


def strict(node):
    """additionalProperties: false wherever the schema lists properties, so typos are caught."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def seed_job(nodes: int, gpus: int) -> dict:
    args = trainer_args(
        SEED_PRESET,
        num_nodes=nodes,
        nproc_per_node=max(gpus, 1),
        dataset_url="s3://pirl/datasets/imagenet1k",
        checkpoint_dir="s3://pirl/runs/r1/pretrain",
        gpus_per_node=gpus,
        overrides=["config.OPTIMIZER.num_epochs=200"],
    )
    return build_pytorchjob(
        name=job_name("pirl", "6f1c2a9e-2b1d-4c43-9b0e-0d6c1f2a3b4c"),
        namespace="team-a",
        image="registry.example.com/ml/pirl:0.1.0",
        args=args,
        num_nodes=nodes,
        nproc_per_node=max(gpus, 1),
        gpus_per_node=gpus,
        cpu_request="64",
        cpu_limit="90",
        memory_request="400Gi",
        memory_limit="600Gi",
        shm_size="64Gi",
        secret_name="pirl-s3-credentials",
        config_map_name="pirl-storage",
        env={"NCCL_DEBUG": "WARN"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        node_selector={"nvidia.com/gpu.present": "true"},
        active_deadline_seconds=604800,
        owner={"apiVersion": "v1", "kind": "Pod", "name": "launcher", "uid": "1234"},
    )


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_pytorchjob_validates_against_the_crd(nodes, gpus):
    import jsonschema

    job = seed_job(nodes, gpus)
    jsonschema.validate(job, crd_schema())
    # also the pod template against Kubernetes' own schemas and the operator webhook's rules
    from .k8s_helpers import PYTORCHJOB_CRD, pytorchjob_errors

    assert pytorchjob_errors(job, PYTORCHJOB_CRD) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    assert job["spec"]["nprocPerNode"] == str(gpus)
    for spec in replicas.values():
        assert spec["restartPolicy"] == "ExitCode"
        tpl = spec["template"]
        assert tpl["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        assert tpl["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        (c,) = tpl["spec"]["containers"]
        assert c["name"] == "pytorch" and c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert c["command"] == ["python", "-m", "pipeline.torchrun"]
        assert {"secretRef": {"name": "pirl-s3-credentials", "optional": True}} in c["envFrom"]
        assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True
        # a step + torchrun's 30 s shutdown must fit in the grace before SIGKILL
        assert tpl["spec"]["terminationGracePeriodSeconds"] >= 65
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 604800


def test_schema_check_catches_a_typo():
    import jsonschema

    job = seed_job(1, 1)
    job["spec"]["runPolicy"]["cleanPodPolicyy"] = "All"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, crd_schema())


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_the_trainer_accepts_the_jobs_arguments(nodes, gpus):
    from pirl import config

    args = seed_job(nodes, gpus)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert args[:2] == ["-m", "pirl.train"]
    cfg, _ = config.load(args[2:], world_size=nodes * gpus)
    assert cfg.DISTRIBUTED.NUM_NODES == nodes and cfg.DISTRIBUTED.NUM_PROC_PER_NODE == gpus
    assert cfg.DATA.TRAIN.DATA_PATHS == ["s3://pirl/datasets/imagenet1k"]
    assert cfg.OPTIMIZER.num_epochs == 200  # the user's override wins


def test_builder_rejects_bad_input():
    with pytest.raises(ValueError, match="DNS-1035"):
        build_pytorchjob(name="Bad_Name", namespace="", image="i", args=[])
    with pytest.raises(ValueError, match="share"):
        build_pytorchjob(
            name="ok", namespace="", image="i", args=[], nproc_per_node=8, gpus_per_node=4
        )
    with pytest.raises(ValueError, match="restart_policy"):
        build_pytorchjob(name="ok", namespace="", image="i", args=[], restart_policy="Sometimes")


# ------------------------------------------------------------------------------ step helpers
def test_flatten_numbers_reads_any_nesting():
    data = {
        "schema_version": 1,
        "a": {"b": 2.5, "c": {"20": 90}},
        "s": "x",
        "l": [1, 2],
        "ok": True,
    }
    assert steps.flatten_numbers(data) == {"schema_version": 1.0, "a.b": 2.5, "a.c.20": 90.0}


def test_training_summary():
    records = [
        {"epoch": 0, "step": 10, "global_step": 10, "loss": 5.0, "images_per_sec": 100.0},
        {"epoch": 0, "global_step": 10, "epoch_loss": 6.0, "epoch_seconds": 1800},
        {"epoch": 1, "step": 10, "global_step": 20, "loss": 4.0, "images_per_sec": 200.0},
        {"epoch": 1, "global_step": 20, "epoch_loss": 4.5, "epoch_seconds": 1800},
    ]
    s = steps.training_summary(records)
    assert s == {
        "final_loss": 4.0,
        "global_steps": 20.0,
        "images_per_sec": 150.0,
        "epochs": 2.0,
        "first_epoch_loss": 6.0,
        "final_epoch_loss": 4.5,
        "train_hours": 1.0,
    }


def test_prep_reuses_an_existing_dataset(tmp_path):
    manifest = {
        "format": "pirl-shards/1",
        "source": "/src",
        "splits": {"train": {"num_samples": 10, "shards": ["a", "b"], "classes": ["0", "1"]}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    art = SimpleNamespace(path=str(tmp_path / "artifact"), metadata={})
    steps.prep("/nowhere", str(tmp_path), art, reuse_existing=True)
    assert art.metadata == {
        "url": str(tmp_path),
        "format": "pirl-shards/1",
        "source": "/src",
        "train_num_samples": 10,
        "train_num_shards": 2,
        "num_classes": 2,
    }
    assert json.loads(Path(art.path).read_text()) == manifest


def test_markdown_images_are_embedded(tmp_path):
    (tmp_path / "report.png").write_bytes(b"\x89PNG")
    text = steps.embed_images(
        "# r\n\n![plot](report.png)\n![web](https://x/y.png)\n", str(tmp_path)
    )
    assert "![plot](data:image/png;base64,iVBORw==)" in text and "(https://x/y.png)" in text


def test_demo_rejects_a_bad_training_override_before_running(tmp_path, capsys):
    from pirl.demo import main as demo_main

    rc = demo_main(["--work", str(tmp_path), "--train-override", "config.LOSS.no_such_key=1"])
    assert rc == 2
    assert "config.LOSS.no_such_key" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written, no step ran


def test_train_backend_is_a_run_parameter_passed_to_the_train_step(fresh):
    doc = next(yaml.safe_load_all(fresh.read_text()))
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert params["train_backend"]["defaultValue"] == "pytorchjob"
    assert "trainjob" in params["train_backend"]["description"]
    train = doc["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train["backend"] == {"componentInputParameter": "train_backend"}


def test_the_train_step_rejects_an_unknown_backend(tmp_path):
    with pytest.raises(steps.StepError, match="backend must be one of"):
        steps.train(
            "s3://x",
            SimpleNamespace(path=str(tmp_path / "m"), metadata={}),
            SimpleNamespace(log_metric=lambda *a: None),
            config=SEED_PRESET,
            overrides=[],
            num_nodes=1,
            nproc_per_node=1,
            gpus_per_node=0,
            image="img",
            run_id="r",
            output_root=str(tmp_path),
            backend="mpijob",
        )


def test_demo_runs_either_backend():
    from pirl.demo import demo_arguments, parse_args

    assert demo_arguments("src", "out")["train_backend"] == "pytorchjob"
    assert demo_arguments("src", "out", backend="trainjob")["train_backend"] == "trainjob"
    assert parse_args(["--backend", "trainjob"]).backend == "trainjob"


def test_the_launcher_step_is_protected_and_retried(fresh):
    """Autoscalers must not move the launcher; if it is evicted anyway, its retry re-attaches."""
    docs = list(yaml.safe_load_all(fresh.read_text()))
    retry = docs[0]["root"]["dag"]["tasks"]["train"]["retryPolicy"]
    assert retry["maxRetryCount"] >= 1 and retry["backoffDuration"] == "60s"
    assert int(retry["backoffMaxDuration"].rstrip("s")) >= 14 * 86400  # the longest wait
    annotations = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"][
        "podMetadata"
    ]["annotations"]
    assert annotations == {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        "karpenter.sh/do-not-disrupt": "true",
    }


def test_steps_get_the_same_storage_settings_as_the_pods(fresh):
    """Every key of the storage ConfigMap reaches every step (the pods take it whole)."""
    configmap = yaml.safe_load(
        (Path(__file__).parents[1] / "manifests/base/storage/configmap.yaml").read_text()
    )
    docs = list(yaml.safe_load_all(fresh.read_text()))
    for ex in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        (cm,) = ex["configMapAsEnv"]
        assert {k["envVar"] for k in cm["keyToEnv"]} == set(configmap["data"])
        assert cm["optional"] is True


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_empty_storage_names_mean_no_references_in_the_pods(backend):
    job_kwargs = dict(
        name="pirl-x", namespace="ns", image="img", args=[], secret_name="", config_map_name=""
    )
    runtime, job = steps.build_job(backend, **job_kwargs)
    pod_owner = runtime if runtime is not None else job
    text = json.dumps(pod_owner)
    assert "envFrom" not in text and "secretRef" not in text and "configMapRef" not in text
