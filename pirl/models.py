"""ResNet/ResNeXt trunks with a true width multiplier, VISSL's heads, and the PIRL/NPID model.

The trunk is torchvision's ResNet (its residual blocks) with VISSL's widths: the stem and every stage
are `width_multiplier` times wider (a ResNet-50-w2 outputs 4096 features; this is not torchvision's
`wide_resnet50_2`, which widens only the bottleneck). Module names match torchvision's, so
`trunk.state_dict()` loads into `torchvision.models.resnet50()` (with `fc` removed) when w=1.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pirl.config import TRUNK_DEPTHS, TRUNK_INITS, head_modules, output_names
from pirl.schema import Config

LAYERS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
    200: [3, 24, 36, 3],
}


def conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


def make_stage(
    block: type[BasicBlock | Bottleneck],
    inplanes: int,
    planes: int,
    blocks: int,
    stride: int,
    groups: int,
    width_per_group: int,
) -> nn.Sequential:
    """One ResNet stage (torchvision's layer1..layer4, same module names): `blocks` residual
    blocks, the first with stride `stride` and a 1x1 projection shortcut when the shape changes."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample, groups, width_per_group)]
    layers += [
        block(out, planes, groups=groups, base_width=width_per_group) for _ in range(1, blocks)
    ]
    return nn.Sequential(*layers)


class ResNetTrunk(nn.Module):
    """conv1..layer4 + global average pool; `forward` returns the flattened res5 features.

    `init`: "pytorch_default" leaves every layer with PyTorch's own initialisation (convolutions
    kaiming-uniform a=sqrt(5), BN weight 1 bias 0), which is what VISSL's trunk gets: it builds
    its layers after torchvision's ResNet has initialised its own, discarded ones.
    "kaiming_fan_out" is torchvision's ResNet init (convolutions kaiming-normal, fan-out, ReLU
    gain): about 2.4x the weight scale (std 0.059 vs 0.024 on a ResNet-50's layer1.0.conv2).
    `zero_init_residual` zeroes each block's last BN weight under either init (VISSL's trunk
    accepts the key but its rebuilt layers never see it).
    """

    def __init__(
        self,
        depth: int = 50,
        width_multiplier: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        layer4_stride: int = 2,
        init: str = "pytorch_default",
    ):
        super().__init__()
        if init not in TRUNK_INITS:
            raise ValueError(f"init={init!r} is not one of {TRUNK_INITS}")
        block = Bottleneck if TRUNK_DEPTHS[depth] == "bottleneck" else BasicBlock
        layers = LAYERS[depth]
        w = 64 * width_multiplier
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = (w, w * 2, w * 4, w * 8)
        strides = (1, 2, 2, layer4_stride)
        inplanes = w
        for i, (planes, blocks, stride) in enumerate(zip(widths, layers, strides, strict=True)):
            stage = make_stage(block, inplanes, planes, blocks, stride, groups, width_per_group)
            setattr(self, f"layer{i + 1}", stage)
            inplanes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.output_dim = inplanes
        if init == "kaiming_fan_out":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps by VISSL's names: conv1, res2, res3, res4, res5."""
        conv1 = self.relu(self.bn1(self.conv1(x)))
        res2 = self.layer1(self.maxpool(conv1))
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        res5 = self.layer4(res4)
        return {"conv1": conv1, "res2": res2, "res3": res3, "res4": res4, "res5": res5}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_trunk(cfg: Config) -> ResNetTrunk:
    r = cfg.MODEL.TRUNK.RESNETS
    return ResNetTrunk(
        r.DEPTH,
        r.WIDTH_MULTIPLIER,
        r.GROUPS,
        r.WIDTH_PER_GROUP,
        r.ZERO_INIT_RESIDUAL,
        r.LAYER4_STRIDE,
        r.INIT,
    )


def mlp(
    dims: list[int],
    use_bn: bool = False,
    use_relu: bool = False,
    use_dropout: bool = False,
    use_bias: bool = True,
    skip_last_layer_relu_bn: bool = True,
) -> nn.Sequential:
    """VISSL's `mlp` head: Linear layers over `dims`, each followed by BN/ReLU/Dropout as asked,
    except after the last Linear when skip_last_layer_relu_bn (the default)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=use_bias))
        if i == len(dims) - 2 and skip_last_layer_relu_bn:
            break
        if use_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        if use_relu:
            layers.append(nn.ReLU(inplace=True))
        if use_dropout:
            layers.append(nn.Dropout())
    return nn.Sequential(*layers)


class SiameseConcatView(nn.Module):
    """(N*towers) x C -> N x (towers*C): the 9 patch embeddings of one image side by side."""

    def __init__(self, num_towers: int):
        super().__init__()
        self.num_towers = num_towers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0] // self.num_towers, -1)


def build_head(spec: list) -> nn.Sequential:
    modules = []
    for name, kwargs in head_modules(spec):
        modules.append(mlp(**kwargs) if name == "mlp" else SiameseConcatView(**kwargs))
    return nn.Sequential(*modules)


class SSLModel(nn.Module):
    """One trunk, one head per input: PIRL has (patches, images), NPID has one input.

    `forward(batch)` runs the trunk separately per input, in mapping order (so BN batch
    statistics are per pass, patches first, as VISSL), and returns {input_key: embedding}.
    """

    def __init__(self, trunk: ResNetTrunk, heads: list[nn.Module], input_keys: list[str]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.input_keys = list(input_keys)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            key: head(self.trunk(batch[key]))
            for key, head in zip(self.input_keys, self.heads, strict=True)
        }


def build_model(cfg: Config) -> SSLModel:
    """Build under fixed seeds (SEED_VALUE + module index), so every rank starts identical."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.SEED_VALUE)
        trunk = build_trunk(cfg)
        heads = []
        for i, spec in enumerate(cfg.MODEL.HEAD.PARAMS):
            torch.manual_seed(cfg.SEED_VALUE + i + 1)
            heads.append(build_head(spec))
    return SSLModel(trunk, heads, output_names(cfg))
