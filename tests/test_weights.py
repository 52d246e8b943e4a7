"""Trunk weights: export to torchvision, import of every supported format, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file

from pirl import checkpoint
from pirl.models import ResNetTrunk
from pirl.weights import (
    WeightsError,
    apply_trunk_weights,
    describe_resnet,
    export_torchvision,
    load_trunk_weights,
    read_trunk_weights,
    state_digest,
)
from pirl.weights import main as weights_main


def make_trunk(depth: int = 18, seed: int = 0) -> ResNetTrunk:
    torch.manual_seed(seed)
    trunk = ResNetTrunk(depth)
    # Non-trivial BN statistics, so a loader that drops buffers would be caught.
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return trunk.eval()


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torchvision_resnet(depth: int) -> torch.nn.Module:
    m = getattr(torchvision.models, f"resnet{depth}")()
    m.fc = torch.nn.Identity()
    return m.eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_export_loads_into_torchvision_strict(tmp_path, depth):
    trunk = make_trunk(depth)
    written = export_torchvision(trunk.state_dict(), str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["trunk.safetensors", "trunk.pt"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = trunk(x)
    for sd in (
        load_file(tmp_path / "trunk.safetensors"),
        torch.load(tmp_path / "trunk.pt", weights_only=True),
    ):
        tv = torchvision_resnet(depth)
        tv.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert torch.equal(tv(x), ref)


def test_export_by_suffix_and_from_a_model_state_dict(tmp_path):
    trunk = make_trunk()
    model_state = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    model_state["heads.0.0.weight"] = torch.zeros(3, 3)
    st = export_torchvision(model_state, str(tmp_path / "a.safetensors"))
    pt = export_torchvision(model_state, str(tmp_path / "b.pt"))
    assert st == [str(tmp_path / "a.safetensors")] and pt == [str(tmp_path / "b.pt")]
    a, b = load_trunk_weights(st[0]), load_trunk_weights(pt[0])
    assert set(a) == set(trunk.state_dict()) == set(b)
    assert state_digest(a) == state_digest(b) == state_digest(trunk.state_dict())


def vissl_checkpoint(trunk: torch.nn.Module) -> dict:
    """The layout of a VISSL model-zoo checkpoint (docs/vissl-notes.md#model-zoo-checkpoints), with the
    usual extra state."""
    return {
        "phase_idx": 799,
        "iteration": 123,
        "iteration_num": 123,
        "train_phase_idx": 799,
        "loss": {"memory": torch.randn(16, 8), "norm_constant": torch.tensor(1.5)},
        "classy_state_dict": {
            "train": True,
            "base_model": {
                "model": {
                    "trunk": {f"_feature_blocks.{k}": v for k, v in trunk.state_dict().items()},
                    "heads": {"0.clf.0.weight": torch.randn(128, 512)},
                },
                "meta": {"version": 1},
            },
            "meters": {"accuracy": np.float64(0.5), "counts": np.arange(3)},
            "optimizer": {"param_groups": [{"lr": 0.1, "momentum": 0.9}]},
        },
    }


def test_vissl_checkpoint_imports_with_identical_features(tmp_path):
    trunk = make_trunk(seed=1)
    path = tmp_path / "model_final_checkpoint_phase799.torch"
    path.write_bytes(torch_bytes(vissl_checkpoint(trunk)))

    weights = read_trunk_weights(str(path))
    assert weights.format == "vissl"
    assert not any(k.startswith("_feature_blocks.") for k in weights.state_dict)
    fresh = make_trunk(seed=2)
    apply_trunk_weights(fresh, weights.state_dict, str(path))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trunk(x))
        for name, value in trunk.stages(x).items():
            assert torch.equal(fresh.stages(x)[name], value), name
    assert state_digest(fresh.state_dict()) == state_digest(trunk.state_dict())


def test_vissl_checkpoint_without_trunk_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.torch"
    path.write_bytes(torch_bytes({"classy_state_dict": {"base_model": {"model": {"heads": {}}}}}))
    with pytest.raises(WeightsError, match="classy_state_dict -> base_model -> model -> trunk"):
        load_trunk_weights(str(path))


def test_training_checkpoint_and_run_directory(tmp_path):
    trunk = make_trunk(seed=3)
    state = {
        "model": {
            **{f"trunk.{k}": v for k, v in trunk.state_dict().items()},
            "heads.0.0.0.weight": torch.randn(128, 512),
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 1,
        "config": "config: {}\n",
    }
    url = checkpoint.save(
        str(tmp_path), state, epoch=1, step_in_epoch=0, global_step=47, keep_last=3
    )
    for source in (url, str(tmp_path)):  # the file, and the run directory (newest checkpoint)
        weights = read_trunk_weights(source)
        assert weights.format == "checkpoint"
        assert weights.resolved_url == url
        assert state_digest(weights.state_dict) == state_digest(trunk.state_dict())

    # A checkpoint whose bytes no longer match its sidecar is refused.
    data = bytearray(open(url, "rb").read())
    data[-100] ^= 0xFF
    open(url, "wb").write(bytes(data))
    with pytest.raises(WeightsError, match="does not match the sha256"):
        load_trunk_weights(str(tmp_path))

    # Once the run exported its trunk, the directory resolves to it.
    export_torchvision(trunk.state_dict(), str(tmp_path))
    weights = read_trunk_weights(str(tmp_path))
    assert weights.resolved_url.endswith("trunk.safetensors")
    assert weights.format == "safetensors"


def test_torchvision_resnet_state_dict_drops_fc(tmp_path):
    tv = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    path.write_bytes(torch_bytes(tv.state_dict()))
    state = load_trunk_weights(str(path))
    assert "fc.weight" not in state
    apply_trunk_weights(ResNetTrunk(18), state, str(path))


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    good = export_torchvision(make_trunk().state_dict(), str(tmp_path / "good.safetensors"))[0]
    data = (tmp_path / "good.safetensors").read_bytes()
    cases = {
        "garbage.pt": (b"\x00\x01not a weights file" * 10, "not a readable weights file"),
        "empty.pt": (b"", "not a readable weights file"),
        "cut.safetensors": (data[: len(data) // 2], "corrupt safetensors"),
        "cut.pt": (torch_bytes(make_trunk().state_dict())[:5000], "not a readable weights file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=message):
            load_trunk_weights(str(tmp_path / name))
    with pytest.raises(WeightsError, match="do not exist"):
        load_trunk_weights(str(tmp_path / "nope.safetensors"))
    with pytest.raises(WeightsError, match="PARAMS_FILE"):
        load_trunk_weights("")
    assert load_trunk_weights(good)  # the uncut file is fine
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(WeightsError, match="directory without trunk.safetensors"):
        load_trunk_weights(str(tmp_path / "empty_run"))


class Sneaky:
    """Unpickling this would create a file: loading must refuse before that happens."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_arbitrary_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(torch_bytes({"conv1.weight": torch.zeros(1), "x": Sneaky(str(marker))}))
    with pytest.raises(WeightsError, match="refused to load"):
        load_trunk_weights(str(path))
    assert not marker.exists()


def test_mismatched_architecture_names_the_keys(tmp_path):
    path = tmp_path / "r18.safetensors"
    export_torchvision(make_trunk(18).state_dict(), str(path))
    state = load_trunk_weights(str(path))
    assert describe_resnet(state) == "ResNet-18 w1"
    with pytest.raises(WeightsError) as info:
        apply_trunk_weights(ResNetTrunk(50), state, str(path))
    msg = str(info.value)
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg and "ResNet-18 w1" in msg and "RESNETS.DEPTH" in msg

    partial = dict(state)
    del partial["layer4.1.bn2.bias"]
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        apply_trunk_weights(ResNetTrunk(18), partial, "partial")
    msg = str(info.value)
    assert "missing keys (1): layer4.1.bn2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg


def test_missing_bn_counters_are_tolerated():
    trunk = make_trunk()
    state = {k: v for k, v in trunk.state_dict().items() if "num_batches_tracked" not in k}
    fresh = ResNetTrunk(18)
    apply_trunk_weights(fresh, state, "no counters")
    assert torch.equal(fresh.bn1.running_var, trunk.bn1.running_var)


def test_weights_cli_converts_a_vissl_checkpoint(tmp_path, capsys):
    trunk = make_trunk(seed=4)
    src = tmp_path / "vissl.torch"
    src.write_bytes(torch_bytes(vissl_checkpoint(trunk)))
    assert weights_main([str(src), str(tmp_path / "out")]) == 0
    assert "ResNet-18 w1 (vissl" in capsys.readouterr().out
    tv = torchvision_resnet(18)
    tv.load_state_dict(load_file(tmp_path / "out" / "trunk.safetensors"), strict=True)
    assert weights_main([str(tmp_path / "missing.pt"), str(tmp_path / "o2")]) == 2
    assert "do not exist" in capsys.readouterr().err


# VISSL's converted-model layout (the zoo's converted NPID R50): a top-level `model_state_dict`,
# which VISSL loads with STATE_DICT_KEY_NAME=model_state_dict and APPEND_PREFIX=trunk.base_model.,
# so its keys carry VISSL's trunk prefix `_feature_blocks.`.
def vissl_converted(trunk: torch.nn.Module, prefix: str = "_feature_blocks.") -> dict:
    return {"model_state_dict": {f"{prefix}{k}": v for k, v in trunk.state_dict().items()}}


@pytest.mark.parametrize("prefix", ["_feature_blocks.", "", "module._feature_blocks."])
def test_vissl_converted_layout_imports_with_identical_features(tmp_path, prefix):
    trunk = make_trunk(seed=5)
    path = tmp_path / "converted_vissl_rn18_npid.torch"
    path.write_bytes(torch_bytes(vissl_converted(trunk, prefix)))
    weights = read_trunk_weights(str(path))
    assert weights.format == "vissl_converted"
    fresh = make_trunk(seed=6)
    apply_trunk_weights(fresh, weights.state_dict, str(path))
    assert state_digest(fresh.state_dict()) == state_digest(trunk.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trunk(x))


def test_vissl_converted_layout_with_numpy_arrays(tmp_path):
    trunk = make_trunk(seed=7)
    arrays = {f"_feature_blocks.{k}": v.numpy() for k, v in trunk.state_dict().items()}
    path = tmp_path / "np.torch"
    path.write_bytes(torch_bytes({"model_state_dict": arrays}))
    weights = read_trunk_weights(str(path))
    assert state_digest(weights.state_dict) == state_digest(trunk.state_dict())


def test_vissl_feature_extractor_trunk_keys(tmp_path):
    """A checkpoint saved by a VISSL evaluation run: trunk keys `base_model._feature_blocks.`."""
    trunk = make_trunk(seed=8)
    ckpt = vissl_checkpoint(trunk)
    model = ckpt["classy_state_dict"]["base_model"]["model"]
    model["trunk"] = {f"base_model.{k}": v for k, v in model["trunk"].items()}
    path = tmp_path / "eval.torch"
    path.write_bytes(torch_bytes(ckpt))
    weights = read_trunk_weights(str(path))
    assert state_digest(weights.state_dict) == state_digest(trunk.state_dict())


def test_model_state_dict_that_is_not_a_dict(tmp_path):
    path = tmp_path / "bad.torch"
    path.write_bytes(torch_bytes({"model_state_dict": [1, 2]}))
    with pytest.raises(WeightsError, match="model_state_dict is a list"):
        load_trunk_weights(str(path))


def vissl_model_keys(head_params: list) -> set[str]:
    """The head keys VISSL's BaseSSLMultiInputOutputModel has for HEAD.PARAMS, linear mlp layers
    only: a head written as a list of modules is an nn.Sequential of them, a single
    [name, kwargs] head is the module itself, and its `mlp` holds its layers in `clf`."""
    keys = set()
    for i, head in enumerate(head_params):
        single = isinstance(head[0], str)
        for j, (name, _) in enumerate([head] if single else head):
            if name == "mlp":
                base = f"heads.{i}.clf.0" if single else f"heads.{i}.{j}.clf.0"
                keys |= {f"{base}.weight", f"{base}.bias"}
    return keys


def as_vissl_loads_it(ckpt: dict) -> dict:
    """What VISSL's init_model_from_consolidated_weights matches against its model's keys (for
    STATE_DICT_KEY_NAME=classy_state_dict, a pretraining model): `trunk.` + trunk keys and
    `heads.` + head keys."""
    model = ckpt["classy_state_dict"]["base_model"]["model"]
    return {
        **{f"trunk.{k}": v for k, v in model["trunk"].items()},
        **{f"heads.{k}": v for k, v in model["heads"].items()},
    }


@pytest.mark.parametrize("single_form_image_head", [False, True])
def test_weights_cli_writes_a_vissl_checkpoint(tmp_path, capsys, single_form_image_head):
    from pirl import config as cfg_mod
    from pirl.models import build_model

    overrides = [
        "config=pretrain/pirl/pirl_demo_resnet18",
        "config.DISTRIBUTED.NUM_NODES=1",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
        # VISSL's own linear heads (vissl_model_keys knows linear layers only)
        "config.MODEL.HEAD.PARAMS=[[[mlp,{dims:[512,128]}],[siamese_concat_view,{num_towers:9}],"
        "[mlp,{dims:[1152,128]}]],[[mlp,{dims:[512,128]}]]]",
    ]
    if single_form_image_head:
        overrides.append("config.MODEL.HEAD.PARAMS.1=[mlp, {dims: [512, 128]}]")
    cfg, _ = cfg_mod.load(overrides)
    model = build_model(cfg)
    state = {"model": model.state_dict(), "epoch": 1, "config": cfg_mod.dump_yaml(cfg)}
    url = checkpoint.save(
        str(tmp_path / "run"), state, epoch=1, step_in_epoch=0, global_step=5, keep_last=1
    )
    dest = tmp_path / "model_final_checkpoint_phase0.torch"
    assert weights_main([url, str(dest), "--format", "vissl"]) == 0
    assert "-> " + str(dest) in capsys.readouterr().out

    ckpt = torch.load(dest, weights_only=True)
    assert ckpt["type"] == "consolidated"
    loaded = as_vissl_loads_it(ckpt)
    trunk_keys = {f"trunk._feature_blocks.{k}" for k in model.trunk.state_dict()}
    assert set(loaded) == trunk_keys | vissl_model_keys(cfg.MODEL.HEAD.PARAMS)
    # The patch head's last linear and the image head, under VISSL's names.
    last = "heads.1.clf.0.weight" if single_form_image_head else "heads.1.0.clf.0.weight"
    assert torch.equal(loaded[last], model.heads[1][0][0].weight)
    assert torch.equal(loaded["heads.0.2.clf.0.weight"], model.heads[0][2][0].weight)
    # Our own loader reads it back bit-identical.
    back = read_trunk_weights(str(dest))
    assert back.format == "vissl"
    assert state_digest(back.state_dict) == state_digest(model.trunk.state_dict())


def test_weights_cli_vissl_format_from_a_trunk_only_file(tmp_path):
    src = tmp_path / "trunk.safetensors"
    trunk = make_trunk(seed=9)
    export_torchvision(trunk.state_dict(), str(src))
    dest = tmp_path / "out.torch"
    assert weights_main([str(src), str(dest), "--format", "vissl"]) == 0
    ckpt = torch.load(dest, weights_only=True)
    assert ckpt["classy_state_dict"]["base_model"]["model"]["heads"] == {}
    assert state_digest(load_trunk_weights(str(dest))) == state_digest(trunk.state_dict())
