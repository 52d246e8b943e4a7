"""The config system: every seed command composes with the values it asks for; bad input is named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pirl import config
from pirl.errors import ConfigError
from pirl.train import main as train_main

from .conftest import subprocess_env

BASE = "config=pretrain/pirl/pirl_jigsaw_4node_resnet50"


def dry_run(capsys, *overrides: str, world: int | None = None) -> dict:
    args = [*overrides, "--dry-run"] + (["--world-size", str(world)] if world else [])
    assert train_main(args) == 0
    return yaml.safe_load(capsys.readouterr().out)


def loss_of(out: dict) -> dict:
    return out["config"]["LOSS"]["nce_loss_with_memory"]


def test_main_seed_command(capsys):
    out = dry_run(capsys, BASE)
    cfg, d = out["config"], out["derived"]
    assert d["world_size"] == 32 and d["global_batch_size"] == 1024
    assert d["lr"]["start_value"] == pytest.approx(0.12) and d["lr"]["end_value"] == pytest.approx(
        1.2e-4
    )
    assert cfg["OPTIMIZER"]["num_epochs"] == 800
    loss = loss_of(out)
    assert loss["loss_type"] == "nce" and loss["temperature"] == 0.07
    assert loss["negative_sampling_params"] == {
        "num_negatives": 32000,
        "type": "random",
        "exclude_positive": False,
    }
    assert loss["loss_weights"] == [0.5, 0.5] and loss["update_mem_with_emb_index"] == 1
    assert loss["memory_params"]["update_mem_on_forward"] is False
    assert (
        cfg["OPTIMIZER"]["regularize_bias"] is False and cfg["OPTIMIZER"]["regularize_bn"] is False
    )
    assert cfg["DATA"]["TRAIN"]["INPUT_KEY_NAMES"] == ["patches", "images"]


def test_seed_npid_loss_overrides(capsys):
    out = dry_run(
        capsys,
        "config=pretrain/npid/npid_8gpu_resnet",
        "config.LOSS.nce_loss_with_memory.temperature=0.05",
        "config.LOSS.nce_loss_with_memory.memory_params.momentum=0.99",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16000",
    )
    loss = loss_of(out)
    assert loss["temperature"] == 0.05
    assert loss["memory_params"]["momentum"] == 0.99
    assert loss["negative_sampling_params"]["num_negatives"] == 16000
    assert loss["memory_params"]["update_mem_on_forward"] is True and loss["loss_weights"] == [1.0]
    assert out["derived"]["world_size"] == 8
    assert out["derived"]["lr"]["values"] == pytest.approx([0.03, 0.003, 0.0003])


def test_seed_resnet101(capsys):
    out = dry_run(
        capsys, BASE, "config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"
    )
    assert out["config"]["MODEL"]["TRUNK"]["RESNETS"]["DEPTH"] == 101
    assert out["derived"]["trunk_output_dim"] == 2048


def test_seed_w2_command_with_its_depth_mistake(capsys):
    # The seed's "ResNet-50-w2" command sets DEPTH=101 and leaves 2048-d heads: heads follow the trunk.
    out = dry_run(
        capsys,
        BASE,
        "config.MODEL.TRUNK.NAME=resnet",
        "config.MODEL.TRUNK.RESNETS.DEPTH=101",
        "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2",
    )
    heads = out["config"]["MODEL"]["HEAD"]["PARAMS"]
    assert out["derived"]["trunk_output_dim"] == 4096
    assert heads[0][0][1]["dims"] == [4096, 128] and heads[1][0][1]["dims"] == [4096, 128]
    assert any("4096" in note for note in out["derived"]["notes"])


def test_seed_gblur(capsys):
    out = dry_run(capsys, BASE, "+config/pretrain/pirl/transforms=photo_gblur")
    names = [t["name"] for t in out["config"]["DATA"]["TRAIN"]["TRANSFORMS"]]
    assert names == [
        "ImgPilToPatchesAndImage",
        "RandomHorizontalFlip",
        "ImgPilColorDistortion",
        "ImgPilGaussianBlur",
        "ToTensor",
        "Normalize",
    ]


def test_seed_mlp_heads(capsys):
    out = dry_run(capsys, BASE, "+config/pretrain/pirl/models=resnet50_mlphead")
    loss = loss_of(out)
    assert loss["loss_type"] == "cross_entropy" and loss["temperature"] == 0.1
    patch, image = out["config"]["MODEL"]["HEAD"]["PARAMS"]
    assert patch[0] == [
        "mlp",
        {"dims": [2048, 2048, 128], "use_relu": True, "skip_last_layer_relu_bn": False},
    ]
    assert image == [["mlp", {"dims": [2048, 2048, 128], "use_relu": True}]]
    assert out["config"]["OPTIMIZER"]["num_epochs"] == 800


@pytest.mark.parametrize("width", [2, 4])
def test_seed_wide_mlp_heads(capsys, width):
    out = dry_run(capsys, BASE, f"+config/pretrain/pirl/models=resnet50_w{width}_mlphead")
    d = 2048 * width
    patch, image = out["config"]["MODEL"]["HEAD"]["PARAMS"]
    assert patch[0][1]["dims"] == [d, d, 128] and patch[0][1]["use_relu"] is True
    # What VISSL really trained: its YAML drops use_relu for the image head
    # (docs/vissl-notes.md#mlp-heads).
    assert image == [["mlp", {"dims": [d, d, 128]}]]
    assert out["config"]["MODEL"]["AMP_PARAMS"]["USE_AMP"] is True
    assert out["config"]["OPTIMIZER"]["num_epochs"] == 400
    assert loss_of(out)["loss_type"] == "cross_entropy"


def test_seed_w2_linear_keeps_nce(capsys):
    out = dry_run(capsys, BASE, "+config/pretrain/pirl/models=resnet50_w2")
    assert out["derived"]["trunk_output_dim"] == 4096
    assert loss_of(out)["loss_type"] == "nce" and loss_of(out)["temperature"] == 0.07


def test_seed_epochs(capsys):
    assert (
        dry_run(capsys, BASE, "config.OPTIMIZER.num_epochs=100")["config"]["OPTIMIZER"][
            "num_epochs"
        ]
        == 100
    )
    out = dry_run(capsys, BASE, "+config/pretrain/pirl/epochs=epochs_200")
    assert out["config"]["OPTIMIZER"]["num_epochs"] == 200


@pytest.mark.parametrize(
    "nodes,procs,start,end",
    [(1, 1, 0.00375, 3.75e-6), (1, 8, 0.03, 3e-5), (4, 8, 0.12, 1.2e-4)],
)
def test_lr_table(capsys, nodes, procs, start, end):
    out = dry_run(
        capsys,
        BASE,
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}",
        f"config.DISTRIBUTED.NUM_NODES={nodes}",
        world=nodes * procs,
    )
    assert out["derived"]["global_batch_size"] == 32 * nodes * procs
    assert out["derived"]["lr"]["start_value"] == pytest.approx(start)
    assert out["derived"]["lr"]["end_value"] == pytest.approx(end)


def test_combined_group_files_and_value_override_wins(capsys):
    out = dry_run(
        capsys,
        BASE,
        "+config/pretrain/pirl/models=resnet50_mlphead",
        "+config/pretrain/pirl/transforms=photo_gblur",
        "+config/pretrain/pirl/epochs=epochs_200",
        "config.LOSS.nce_loss_with_memory.temperature=0.2",
    )
    assert loss_of(out)["temperature"] == 0.2
    assert out["config"]["OPTIMIZER"]["num_epochs"] == 200
    assert loss_of(out)["loss_type"] == "cross_entropy"


def test_demo_presets_compose(capsys):
    out = dry_run(capsys, "config=pretrain/pirl/pirl_demo_resnet18")
    assert out["derived"]["world_size"] == 1 and out["derived"]["trunk_output_dim"] == 512
    out = dry_run(capsys, "config=pretrain/npid/npid_demo_resnet18")
    centred = {"dims": [512, 128], "use_bn": True, "skip_last_layer_relu_bn": False}
    assert out["config"]["MODEL"]["HEAD"]["PARAMS"] == [[["mlp", centred]]]


def test_quick_pirl_at_vissls_name(capsys):
    out = dry_run(capsys, "config=test/integration_test/quick_pirl")
    cfg = out["config"]
    assert cfg["DATA"]["TRAIN"]["DATA_LIMIT"] == 500 and cfg["OPTIMIZER"]["num_epochs"] == 2
    assert loss_of(out)["negative_sampling_params"]["num_negatives"] == 4096
    assert out["derived"]["world_size"] == 1
    assert out["derived"]["lr"]["start_value"] == pytest.approx(0.3 * 32 / 256)
    # 4,096 negatives over its 500 images: legal, as in VISSL
    built = config.build(config.compose(["config=test/integration_test/quick_pirl"]))
    config.fit_dataset(*config.derive(built, 1), num_train_samples=500)


@pytest.mark.parametrize(
    "model, depth, width, dim",
    [("resnet50", 50, 1, 2048), ("resnet101", 101, 1, 2048), ("resnet50_w2", 50, 2, 4096)]
    + [("resnet50_w3", 50, 3, 6144)],
)
def test_npid_model_groups(capsys, model, depth, width, dim):
    out = dry_run(
        capsys, "config=pretrain/npid/npid_8gpu_resnet", f"+config/pretrain/npid/models={model}"
    )
    r = out["config"]["MODEL"]["TRUNK"]["RESNETS"]
    assert (r["DEPTH"], r["WIDTH_MULTIPLIER"]) == (depth, width)
    assert out["derived"]["trunk_output_dim"] == dim
    assert out["config"]["MODEL"]["HEAD"]["PARAMS"] == [["mlp", {"dims": [dim, 128]}]]


def test_npid_optimization_groups(capsys):
    base = ["config=pretrain/npid/npid++_4nodes_resnet"]
    out = dry_run(capsys, *base, "+config/pretrain/npid/optimizations=bs32_4node_cosineLR")
    assert out["derived"]["world_size"] == 32 and out["config"]["OPTIMIZER"]["num_epochs"] == 200
    assert out["derived"]["lr"]["start_value"] == pytest.approx(0.12)
    assert out["derived"]["lr"]["end_value"] == pytest.approx(0.00012)
    out = dry_run(capsys, *base, "+config/pretrain/npid/optimizations=bs32_4node_stepLR")
    assert out["derived"]["lr"]["values"] == pytest.approx([0.12, 0.012, 0.0012])
    assert out["derived"]["lr"]["milestones"] == [120, 160]


def test_single_module_head_form_builds_the_same_model():
    """VISSL accepts a head as one [name, kwargs] module as well as a list of them."""
    import torch

    from pirl.models import build_model

    models = []
    for params in ("[[mlp, {dims: [512, 128]}]]", "[[[mlp, {dims: [512, 128]}]]]"):
        cfg = config.build(
            config.compose(
                ["config=pretrain/npid/npid_demo_resnet18", f"config.MODEL.HEAD.PARAMS={params}"]
            )
        )
        cfg, _ = config.derive(cfg)
        models.append(build_model(cfg))
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(
        ConfigError, match=r"HEAD.PARAMS\[0\]\[1\].dim='dim' is not supported.*'dims'"
    ):
        config.build(
            config.compose(
                [
                    "config=pretrain/npid/npid_demo_resnet18",
                    "config.MODEL.HEAD.PARAMS=[[mlp, {dim: [512, 128]}]]",
                ]
            )
        )


@pytest.mark.parametrize(
    "sweep",
    [
        "config.OPTIMIZER.weight_decay=0.001,0.0001",
        "+config/pretrain/pirl/models=resnet50_w2,resnet50_w4",
        "config.OPTIMIZER.num_epochs=range(1,3)",
    ],
)
def test_comma_sweeps_say_multirun_is_unsupported(capsys, sweep):
    assert train_main([BASE, sweep, "--dry-run"]) == 2
    err = capsys.readouterr().err
    key = sweep.split("=")[0]
    assert f"is a sweep over {key}" in err and "one run per value" in err
    assert "unknown config key" not in err


def test_lists_and_quoted_commas_are_not_sweeps(capsys):
    out = dry_run(capsys, BASE, "config.DATA.TRAIN.DATA_PATHS=[/a,/b]")
    assert out["config"]["DATA"]["TRAIN"]["DATA_PATHS"] == ["/a", "/b"]
    out = dry_run(capsys, BASE, "config.CHECKPOINT.DIR='runs/a,b'")
    assert out["config"]["CHECKPOINT"]["DIR"] == "runs/a,b"


def test_benchmark_refuses_sweeps_too(capsys):
    from pirl.benchmark import main as bench_main

    preset = "config=benchmark/linear_image_classification/demo/eval_resnet18_demo_linear"
    assert bench_main([preset, "config.OPTIMIZER.weight_decay=0.1,0.2", "--dry-run"]) == 2
    assert "is a sweep over config.OPTIMIZER.weight_decay" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["npid_8gpu_resnet", "npid++_4nodes_resnet"])
def test_npid_transforms_in_vissls_order(capsys, preset):
    """ColorJitter on the whole image, then RandomResizedCrop, as VISSL's NPID presets."""
    out = dry_run(capsys, f"config=pretrain/npid/{preset}")
    names = [t["name"] for t in out["config"]["DATA"]["TRAIN"]["TRANSFORMS"]]
    assert names == ["ColorJitter", "RandomResizedCrop", "RandomHorizontalFlip", "ToTensor"] + [
        "Normalize"
    ]


@pytest.mark.parametrize("feature", ["res4", "conv1"])
def test_head_mapping_features_other_than_flatten_are_refused(feature):
    mapping = f"config.MODEL.MULTI_INPUT_HEAD_MAPPING=[[patches, [flatten]], [images, [{feature}]]]"
    with pytest.raises(
        ConfigError, match=rf"MULTI_INPUT_HEAD_MAPPING\[1\] feature \['{feature}'\]"
    ):
        config.load([BASE, mapping])
    with pytest.raises(ConfigError, match="use \\[flatten\\]"):
        config.load(
            [
                BASE,
                "config.MODEL.MULTI_INPUT_HEAD_MAPPING=[[patches, [flatten, res4]], [images, [flatten]]]",
            ]
        )
    config.load(
        [BASE, "config.MODEL.MULTI_INPUT_HEAD_MAPPING=[[patches, [res5avg]], [images, [flatten]]]"]
    )


def test_sqrt_and_multistep_scaling():
    cfg = config.build(config.compose(["config=pretrain/npid/npid_8gpu_resnet"]))
    sched = cfg.OPTIMIZER.param_schedulers.lr
    sched.auto_lr_scaling.scaling_type = "sqrt"
    factor, lr = config.scaled_lr_schedule(sched, 1024)
    assert factor == pytest.approx(2.0)
    assert lr["values"] == pytest.approx([0.06, 0.006, 0.0006])
    assert config.lr_at(lr, 119.9, 200) == pytest.approx(0.06)
    assert config.lr_at(lr, 120, 200) == pytest.approx(0.006)
    assert config.lr_at(lr, 199, 200) == pytest.approx(0.0006)
    sched.name, sched.value = "constant", 0.5
    assert config.scaled_lr_schedule(sched, 512)[1]["value"] == pytest.approx(0.03 * 2**0.5)


def test_cosine_is_constant_within_an_epoch():
    lr = {"name": "cosine", "update_interval": "epoch", "start_value": 0.12, "end_value": 0.00012}
    assert config.lr_at(lr, 0.9, 800) == pytest.approx(0.12)
    assert config.lr_at(lr, 400, 800) == pytest.approx(0.00012 + 0.5 * (0.12 - 0.00012))
    step = dict(lr, update_interval="step")
    assert config.lr_at(step, 0.5, 1) == pytest.approx(0.00012 + 0.5 * (0.12 - 0.00012))


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "config.LOSS.nce_loss_with_memory.temprature=0.05",
            "did you mean 'config.LOSS.nce_loss_with_memory.temperature'",
        ),
        ("config.OPTIMIZER.num_epoch=5", "did you mean 'config.OPTIMIZER.num_epochs'"),
        ("config.LOSS.nce_loss_with_memory.temperature=0", "temperature must be > 0"),
        ("config.LOSS.nce_loss_with_memory.temperature=abc", "temperature must be a number"),
        ("config.OPTIMIZER.num_epochs=1.5", "num_epochs must be an integer"),
        ("config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=5", "WIDTH_MULTIPLIER=5 is not supported"),
        ("config.MODEL.TRUNK.RESNETS.DEPTH=42", "DEPTH=42 is not supported"),
        (
            "config.LOSS.nce_loss_with_memory.loss_weights=[1.0]",
            "loss_weights has 1 entries but the model has 2",
        ),
        (
            "config.LOSS.nce_loss_with_memory.memory_params.embedding_dim=64",
            "outputs 128-d embeddings",
        ),
        (
            "config.LOSS.nce_loss_with_memory.loss_type=infonce",
            "loss_type='infonce' is not supported",
        ),
        (
            "config.MODEL.HEAD.PARAMS=[[[mlp,{dims:[2048,128]},{use_relu:true}]]]",
            "must be exactly [name, {kwargs}]",
        ),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config.load([BASE, override])


def test_missing_or_unknown_preset():
    with pytest.raises(ConfigError, match="no preset chosen"):
        config.load([])
    with pytest.raises(ConfigError, match="pretrain/pirl/pirl_jigsaw_4node_resnet50"):
        config.load(["config=pretrain/pirl/pirl_jigsaw"])


def test_num_negatives_at_or_above_dataset_size_is_a_warning(caplog):
    """Legal in VISSL (sampling with replacement): its quick_pirl draws 4,096 from 500 images."""
    cfg = config.build(
        config.compose(
            [
                "config=pretrain/pirl/pirl_demo_resnet18",
                "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=1024",
            ]
        )
    )
    cfg, derived = config.derive(cfg, 1)
    with caplog.at_level("WARNING", logger="pirl"):
        fitted, fitted_derived = config.fit_dataset(cfg, derived, num_train_samples=1000)
    assert "num_negatives=1024 >= the dataset's 1000 samples" in caplog.text
    assert "with replacement" in caplog.text
    assert any("num_negatives=1024" in n for n in fitted_derived.notes)
    assert fitted.LOSS.nce_loss_with_memory.memory_params.memory_size == 1000
    assert fitted_derived.num_train_samples == 1000
    caplog.clear()
    fitted, _ = config.fit_dataset(cfg, derived, num_train_samples=5000)
    assert "num_negatives" not in caplog.text
    assert fitted.LOSS.nce_loss_with_memory.memory_params.memory_size == 5000
    cfg.LOSS.nce_loss_with_memory.negative_sampling_params.exclude_positive = True
    with pytest.raises(ConfigError, match="exclude_positive needs a dataset of at least 2"):
        config.fit_dataset(cfg, derived, num_train_samples=1)


def test_world_size_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="the job runs 2 process"):
        config.load([BASE], world_size=2)


def test_cli_exit_codes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "pirl", "train", BASE, "--dry-run"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["derived"]["world_size"] == 32
    bad = subprocess.run(
        [sys.executable, "-m", "pirl.train", BASE, "config.OPTIMIZER.num_epoch=5", "--dry-run"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert bad.returncode == 2
    assert "did you mean 'config.OPTIMIZER.num_epochs'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_missing_dataset_path_is_a_data_error(tmp_path, capsys):
    rc = train_main(
        [
            "config=pretrain/pirl/pirl_demo_resnet18",
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path}/nope]",
            f"config.CHECKPOINT.DIR={tmp_path}/out",
        ]
    )
    assert rc == 3
    assert f"{tmp_path}/nope" in capsys.readouterr().err


def test_transforms_on_device_accept_the_presets_and_name_what_they_cannot_run():
    for preset in (
        "pretrain/pirl/pirl_jigsaw_4node_resnet50",
        "pretrain/npid/npid_demo_resnet18",
        "pretrain/pirl/pirl_demo_resnet18",
    ):
        config.load([f"config={preset}", "config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true"])
    # VISSL's NPID order (ColorJitter on the whole image, then the crop) is CPU-only.
    with pytest.raises(ConfigError, match="jitter the whole image before the crop"):
        config.load(
            ["config=pretrain/npid/npid_8gpu_resnet", "config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true"]
        )
    gblur = "+config/pretrain/pirl/transforms=photo_gblur"
    config.load([BASE, gblur, "config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true"])
    with pytest.raises(ConfigError, match="CenterCrop") as exc:
        config.load(
            [
                "config=pretrain/npid/npid_8gpu_resnet",
                "config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true",
                "config.DATA.TRAIN.TRANSFORMS=[{name:CenterCrop,size:32},{name:ToTensor}]",
            ]
        )
    assert "TRANSFORMS_ON_DEVICE" in str(exc.value)


def test_derive_is_pure_and_its_notes_survive_the_dataset_step():
    cfg = config.build(config.compose([BASE, "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2"]))
    before = config.dump_yaml(cfg)
    resolved, derived = config.derive(cfg, 32)
    assert config.dump_yaml(cfg) == before  # the input is left as it was
    assert resolved.MODEL.HEAD.PARAMS[0][0][1]["dims"] == [4096, 128]
    assert any("input 2048 -> 4096" in note for note in derived.notes)
    fitted, fitted_derived = config.fit_dataset(resolved, derived, 5000)
    assert resolved.LOSS.nce_loss_with_memory.memory_params.memory_size == -1
    assert fitted.LOSS.nce_loss_with_memory.memory_params.memory_size == 5000
    assert derived.notes and set(derived.notes) <= set(fitted_derived.notes)


def test_head_input_notes_reach_the_training_log(tmp_path, digits_folder, capsys, monkeypatch):
    """The derived record load() makes is the one training logs (it used to be re-derived from
    the already rewritten config, so the rewrite notes were lost); a run derives once."""
    from .test_train import tiny

    calls = []
    for name in ("derive", "fit_dataset"):
        real = getattr(config, name)
        monkeypatch.setattr(
            config,
            name,
            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k),
        )
    args = tiny(tmp_path, digits_folder, "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2")
    args += ["config.OPTIMIZER.num_epochs=1", "config.MAX_STEPS=1"]
    assert train_main(args) == 0
    assert "input 512 -> 1024 (follows the trunk output)" in capsys.readouterr().out
    assert calls == ["derive", "fit_dataset"]


def test_the_launchers_environment_is_read_by_dist_alone(monkeypatch):
    """`config.load` used to read WORLD_SIZE itself; the launch is now checked once, by the
    caller, against the world size `pirl.dist` read."""
    from pirl import dist
    from pirl.benchmark import config as bench_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg, derived = config.load(["config=pretrain/pirl/pirl_demo_resnet18"])
    bench_config.load(
        ["config=benchmark/linear_image_classification/demo/eval_resnet18_demo_linear"]
    )
    _, _, world = dist.launch_env()
    with pytest.raises(ConfigError, match="the job runs 2 process"):
        config.check_world_size(cfg, world)


def test_vissl_only_keys_are_marked_and_warn_when_set(caplog):
    import dataclasses
    import typing

    from pirl.schema import Config

    def marked(cls) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            out += (
                marked(tp)
                if dataclasses.is_dataclass(tp)
                else [f.name] * bool(f.metadata.get("vissl_only"))
            )
        return out

    names = marked(Config)
    assert {"GROUP_SIZE", "AMP_ARGS", "LABEL_SOURCES", "NCCL_DEBUG"} <= set(names)
    assert len(names) >= 15
    with caplog.at_level("WARNING", logger="pirl"):
        config.load(["config=pretrain/pirl/pirl_demo_resnet18"])
    assert "VISSL key" not in caplog.text  # the defaults and the demo preset set none
    with caplog.at_level("WARNING", logger="pirl"):
        config.load(
            [
                "config=pretrain/pirl/pirl_demo_resnet18",
                "config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=8",
                "config.MODEL.AMP_PARAMS.AMP_ARGS={opt_level: O2}",
            ]
        )
    lines = [r.getMessage() for r in caplog.records if "VISSL key" in r.getMessage()]
    assert lines == [
        "config: config.MODEL.AMP_PARAMS.AMP_ARGS={'opt_level': 'O2'} is a VISSL key that has "
        "no effect here",
        "config: config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=8 is a VISSL key that has no effect here",
    ]


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "config.LOSS.nce_loss_with_memory.memory_params.momentum=1.0",
            "config.LOSS.nce_loss_with_memory.memory_params.momentum must be in [0, 1), got 1.0",
        ),
        (
            "config.DATA.TRAIN.DATA_SOURCES=[disk_foldr]",
            "config.DATA.TRAIN.DATA_SOURCES[0]='disk_foldr' is not supported; use one of "
            "['disk_filelist', 'disk_folder', 'shards', 'synthetic'] (did you mean 'disk_folder'?)",
        ),
        ("config.DISTRIBUTED.NUM_NODES=0", "config.DISTRIBUTED.NUM_NODES must be >= 1, got 0"),
        (
            "config.OPTIMIZER.weight_decay=-1",
            "config.OPTIMIZER.weight_decay must be >= 0, got -1.0",
        ),
        (
            "config.DATA.TEST.LABEL_TYPE=labels",
            "config.DATA.TEST.LABEL_TYPE='labels' is not supported",
        ),
    ],
)
def test_field_rules_name_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        config.load([BASE, override])
    assert message in str(err.value)


def test_every_default_obeys_its_own_rule():
    from pirl.benchmark.schema import BenchmarkConfig
    from pirl.fields import check_tree
    from pirl.schema import Config

    check_tree(Config(), "config")
    check_tree(BenchmarkConfig(), "config")
