"""ResNet/ResNeXt trunks with a true width multiplier, VISSL's heads, and the PIRL/NPID model.

The trunk is torchvision's ResNet rebuilt as VISSL's `resnext.py` does: the stem and every stage
are `width_multiplier` times wider (a ResNet-50-w2 outputs 4096 features; this is not torchvision's
`wide_resnet50_2`, which widens only the bottleneck). Module names match torchvision's, so
`trunk.state_dict()` loads into `torchvision.models.resnet50()` (with `fc` removed) when w=1.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from pirl.config import TRUNK_DEPTHS, head_modules, output_names
from pirl.schema import Config

LAYERS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
    200: [3, 24, 36, 3],
}


class ResNetTrunk(nn.Module):
    """conv1..layer4 + global average pool; `forward` returns the flattened res5 features."""

    def __init__(
        self,
        depth: int = 50,
        width_multiplier: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        layer4_stride: int = 2,
    ):
        super().__init__()
        block = Bottleneck if TRUNK_DEPTHS[depth] == "bottleneck" else BasicBlock
        layers = LAYERS[depth]
        # torchvision's ResNet gives us _make_layer and its init; we rebuild the widths.
        base = ResNet(
            block,
            layers,
            groups=groups,
            width_per_group=width_per_group,
            zero_init_residual=zero_init_residual,
        )
        w = 64 * width_multiplier
        base.inplanes = w
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = base._make_layer(block, w, layers[0])
        self.layer2 = base._make_layer(block, w * 2, layers[1], stride=2)
        self.layer3 = base._make_layer(block, w * 4, layers[2], stride=2)
        self.layer4 = base._make_layer(block, w * 8, layers[3], stride=layer4_stride)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.output_dim = w * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
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
