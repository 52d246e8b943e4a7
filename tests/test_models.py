"""Trunks, heads and the PIRL/NPID model: shapes for every preset, widths, torchvision compatibility."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pirl import config
from pirl.errors import ConfigError
from pirl.models import ResNetTrunk, build_head, build_model, mlp

PRESETS = [
    ["config=pretrain/pirl/pirl_jigsaw_4node_resnet50"],
    [
        "config=pretrain/pirl/pirl_jigsaw_4node_resnet50",
        "+config/pretrain/pirl/models=resnet50_mlphead",
    ],
    ["config=pretrain/pirl/pirl_jigsaw_4node_resnet50", "+config/pretrain/pirl/models=resnet50_w2"],
    [
        "config=pretrain/pirl/pirl_jigsaw_4node_resnet50",
        "+config/pretrain/pirl/models=resnet50_w2_mlphead",
    ],
    ["config=pretrain/pirl/pirl_jigsaw_4node_resnet50", "+config/pretrain/pirl/models=resnet50_w4"],
    [
        "config=pretrain/pirl/pirl_jigsaw_4node_resnet50",
        "+config/pretrain/pirl/models=resnet50_w4_mlphead",
    ],
    ["config=pretrain/npid/npid_8gpu_resnet"],
    ["config=pretrain/pirl/pirl_demo_resnet18"],
    ["config=pretrain/npid/npid_demo_resnet18"],
]


@pytest.mark.parametrize("overrides", PRESETS, ids=lambda o: o[-1].rsplit("/", 1)[-1])
def test_head_shapes_for_every_preset(overrides):
    cfg, derived = config.load(overrides)
    b = 3
    feats = derived.trunk_output_dim
    heads = [build_head(spec) for spec in cfg.MODEL.HEAD.PARAMS]
    inputs = config.output_names(cfg)
    for key, head in zip(inputs, heads, strict=True):
        n = 9 * b if key == "patches" else b
        out = head(torch.randn(n, feats))
        assert out.shape == (b, 128), key


def test_mlp_head_layers_follow_vissl():
    # resnet50_mlphead patch head: Linear, ReLU, Linear, ReLU (skip_last_layer_relu_bn False)
    head = mlp([8, 8, 4], use_relu=True, skip_last_layer_relu_bn=False)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    head = mlp([8, 8, 4], use_relu=True)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    head = mlp([8, 8, 4])  # the w2/w4 image head as VISSL trained it: no nonlinearity
    assert [type(m) for m in head] == [nn.Linear, nn.Linear]
    head = mlp([8, 4, 2], use_bn=True, use_relu=True)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_patch_head_concatenates_nine_patches_sample_major():
    head = build_head([["siamese_concat_view", {"num_towers": 9}]])
    x = torch.arange(2 * 9 * 3, dtype=torch.float).reshape(18, 3)
    out = head(x)
    assert out.shape == (2, 27)
    assert torch.equal(out[1], x[9:].reshape(-1))


@pytest.mark.parametrize(
    "depth,width,dim", [(18, 1, 512), (18, 2, 1024), (50, 1, 2048), (50, 2, 4096)]
)
def test_trunk_width_multiplier_scales_every_stage(depth, width, dim):
    trunk = ResNetTrunk(depth, width)
    assert trunk.output_dim == dim
    assert trunk.conv1.out_channels == 64 * width
    assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_resnext_groups():
    trunk = ResNetTrunk(50, 1, groups=32, width_per_group=4)
    assert trunk.layer1[0].conv2.groups == 32
    assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


@pytest.mark.parametrize(
    "depth,ctor", [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)]
)
def test_trunk_weights_load_into_torchvision(depth, ctor):
    trunk = ResNetTrunk(depth)
    tv = ctor()
    tv.fc = nn.Identity()
    tv.load_state_dict(trunk.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    trunk.eval()
    tv.eval()
    assert torch.allclose(trunk(x), tv(x), atol=1e-5)


def test_pirl_model_named_outputs_and_identical_init():
    cfg, _ = config.load(["config=pretrain/pirl/pirl_demo_resnet18"])
    a, b = build_model(cfg), build_model(cfg)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # every rank builds the same model
    out = a({"patches": torch.randn(2 * 9, 3, 12, 12), "images": torch.randn(2, 3, 32, 32)})
    assert list(out) == ["patches", "images"]
    assert out["patches"].shape == (2, 128) and out["images"].shape == (2, 128)


def test_npid_model_has_one_output():
    cfg, _ = config.load(["config=pretrain/npid/npid_demo_resnet18"])
    out = build_model(cfg)({"data": torch.randn(2, 3, 32, 32)})
    assert list(out) == ["data"] and out["data"].shape == (2, 128)


def test_trunk_builds_its_stages_without_a_torchvision_resnet(monkeypatch):
    """The stages are built directly: no throwaway torchvision ResNet, no private `_make_layer`."""

    def refuse(*args, **kwargs):
        raise AssertionError("a torchvision ResNet was constructed")

    monkeypatch.setattr(torchvision.models.resnet.ResNet, "__init__", refuse)
    monkeypatch.setattr(torchvision.models.resnet.ResNet, "_make_layer", refuse)
    for depth, groups, width_per_group in ((18, 1, 64), (50, 32, 4)):
        ResNetTrunk(depth, 2, groups, width_per_group)


@pytest.mark.parametrize(
    "depth,width,groups,wpg,ctor",
    [
        (18, 1, 1, 64, torchvision.models.resnet18),
        (50, 1, 1, 64, torchvision.models.resnet50),
        (50, 1, 32, 4, torchvision.models.resnext50_32x4d),
    ],
)
def test_trunk_state_dict_keys_and_shapes_are_torchvisions(depth, width, groups, wpg, ctor):
    ours = {k: v.shape for k, v in ResNetTrunk(depth, width, groups, wpg).state_dict().items()}
    tv = {k: v.shape for k, v in ctor().state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(tv)
    assert ours == tv


def test_trunk_init_pytorch_default_is_vissls_and_kaiming_fan_out_is_torchvisions():
    """VISSL's trunk keeps PyTorch's layer init (conv std 1/sqrt(3 fan_in)); the option is
    torchvision's kaiming-normal fan-out (std sqrt(2 / fan_out))."""
    torch.manual_seed(0)
    default = ResNetTrunk(50).layer1[0].conv2.weight  # 64 -> 64, 3x3: fan_in = fan_out = 576
    kaiming = ResNetTrunk(50, init="kaiming_fan_out").layer1[0].conv2.weight
    assert default.std().item() == pytest.approx(1 / (3 * 576) ** 0.5, rel=0.03)  # 0.024
    assert default.abs().max().item() <= 1 / 576**0.5  # uniform, bound 1/sqrt(fan_in)
    assert kaiming.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.03)  # 0.059
    tv = torchvision.models.resnet50().layer1[0].conv2.weight
    assert tv.std().item() == pytest.approx(kaiming.std().item(), rel=0.03)


def test_trunk_init_is_a_config_key():
    """VISSL's presets get VISSL's init; the demo presets keep torchvision's (measured better)."""
    for preset in ("pretrain/npid/npid_8gpu_resnet", "pretrain/pirl/pirl_jigsaw_4node_resnet50"):
        cfg, _ = config.load([f"config={preset}"])
        assert cfg.MODEL.TRUNK.RESNETS.INIT == "pytorch_default"
    for preset in ("pretrain/npid/npid_demo_resnet18", "pretrain/pirl/pirl_demo_resnet18"):
        cfg, _ = config.load([f"config={preset}"])
        assert cfg.MODEL.TRUNK.RESNETS.INIT == "kaiming_fan_out"
    with pytest.raises(ConfigError, match="RESNETS.INIT"):
        config.load(
            ["config=pretrain/npid/npid_demo_resnet18", "config.MODEL.TRUNK.RESNETS.INIT=xavier"]
        )
