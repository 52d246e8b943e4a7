"""The benchmark's typed config: VISSL's linear-eval keys, plus a few of ours (marked "ours").

Shared blocks come from `pirl.schema` (DATA, MODEL.TRUNK, OPTIMIZER, DISTRIBUTED, MACHINE), so a
key means the same in `pirl train` and `pirl benchmark`. The defaults are VISSL's linear-eval
protocol (docs/vissl-notes.md#linear-evaluation-protocol; ImageNet-1K linear eval of a ResNet-50:
28 epochs, multistep LR, nesterov, wd 5e-4, res5 and res5avg heads, tested after every epoch); the presets under
`configs/config/benchmark/` set the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pirl.fields import require, setting
from pirl.schema import (
    AmpParams,
    AutoLRScaling,
    Data,
    DataSplit,
    Distributed,
    Head,
    Hooks,
    LRSchedule,
    Machine,
    Optimizer,
    ParamSchedulers,
    SyncBNConfig,
    Trunk,
)

FEATURES = ("conv1", "res2", "res3", "res4", "res5", "res5avg")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _train_transforms() -> list[Any]:
    return [
        {"name": "RandomResizedCrop", "size": 224},
        {"name": "RandomHorizontalFlip"},
        {"name": "ToTensor"},
        {"name": "Normalize", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    ]


def _test_transforms() -> list[Any]:
    return [
        {"name": "Resize", "size": 256},
        {"name": "CenterCrop", "size": 224},
        {"name": "ToTensor"},
        {"name": "Normalize", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    ]


def _data() -> Data:
    def split(name: str, transforms: list[Any]) -> DataSplit:
        return DataSplit(
            SPLIT=name, TRANSFORMS=transforms, BATCHSIZE_PER_REPLICA=32, LABEL_TYPE="standard"
        )

    return Data(TRAIN=split("train", _train_transforms()), TEST=split("val", _test_transforms()))


@dataclass
class WeightsInit:
    # The trunk to evaluate (any fsspec URL): trunk.safetensors / trunk.pt (ours or any
    # torchvision-style ResNet), a training checkpoint checkpoints/checkpoint-*.pt, a training run
    # directory (its trunk.safetensors, else its newest checkpoint), or a VISSL model-zoo file in
    # either layout (classy_state_dict -> base_model -> model -> trunk, or the converted models'
    # top-level model_state_dict; `_feature_blocks.` keys), with no conversion step.
    PARAMS_FILE: str = ""
    # VISSL's; the format is detected, not read
    STATE_DICT_KEY_NAME: str = setting("classy_state_dict", vissl_only=True)


def _pool_ops() -> list[Any]:
    return [["res5", ["AvgPool2d", [[6, 6], 1, 0]]], ["res5avg", ["Identity", []]]]


@dataclass
class FeatureEvalSettings:
    EVAL_MODE_ON: bool = True  # the trunk runs in eval mode (BN uses its running statistics)
    FREEZE_TRUNK_ONLY: bool = True  # the trunk is frozen, only the heads train
    # One entry per head, in HEAD.PARAMS order: [feature, [op, args]] with feature one of conv1,
    # res2, res3, res4, res5, res5avg and op AvgPool2d ([kernel, stride, padding]),
    # AdaptiveAvgPool2d ([output_size], ours: resolution-independent) or Identity ([]).
    LINEAR_EVAL_FEAT_POOL_OPS_MAP: list[Any] = field(default_factory=_pool_ops)
    # ours: run the trunk over the train split once (with DATA.TRAIN.TRANSFORMS) and train the
    # heads on those features every epoch. For small sets with deterministic transforms (the
    # demo); VISSL's protocol (false) runs the trunk on freshly augmented crops every epoch.
    CACHE_TRAIN_FEATURES: bool = False

    def check(self, path: str) -> None:
        require(
            self.EVAL_MODE_ON and self.FREEZE_TRUNK_ONLY,
            f"{path}.EVAL_MODE_ON and FREEZE_TRUNK_ONLY must be true: the benchmark evaluates a "
            "frozen trunk (fine-tuning is not supported)",
        )


def _heads() -> Head:
    return Head(
        PARAMS=[
            ["eval_mlp", {"in_channels": 2048, "dims": [8192, 1000]}],
            ["eval_mlp", {"in_channels": 2048, "dims": [2048, 1000]}],
        ]
    )


@dataclass
class BenchmarkModel:
    TRUNK: Trunk = field(default_factory=Trunk)
    WEIGHTS_INIT: WeightsInit = field(default_factory=WeightsInit)
    FEATURE_EVAL_SETTINGS: FeatureEvalSettings = field(default_factory=FeatureEvalSettings)
    # Heads, one per LINEAR_EVAL_FEAT_POOL_OPS_MAP entry: [eval_mlp, {in_channels, dims}] (BN +
    # linear, VISSL's) or [mlp, {dims}] (linear). The input size (in_channels, dims[0]) follows the
    # pooled feature and dims[-1] the dataset's classes; both are derived at run time.
    HEAD: Head = field(default_factory=_heads)
    AMP_PARAMS: AmpParams = field(
        default_factory=AmpParams
    )  # autocast of the trunk, as in training
    SYNC_BN_CONFIG: SyncBNConfig = field(
        default_factory=lambda: SyncBNConfig(CONVERT_BN_TO_SYNC_BN=True)
    )  # SyncBN in the heads' BN across ranks (GPU only)


def _optimizer() -> Optimizer:
    return Optimizer(
        name="sgd",
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        regularize_bn=False,
        regularize_bias=True,
        num_epochs=28,
        param_schedulers=ParamSchedulers(
            lr=LRSchedule(
                auto_lr_scaling=AutoLRScaling(
                    auto_scale=True, base_value=0.01, base_lr_batch_size=256
                ),
                name="multistep",
                values=[0.01, 0.001, 0.0001, 0.00001],
                milestones=[8, 16, 24],
                update_interval="epoch",
            )
        ),
    )


@dataclass
class Knn:  # ours: weighted kNN on L2-normalised features (NPID, Wu et al. 2018)
    ENABLED: bool = True
    K: list[int] = field(default_factory=lambda: [20, 200])
    TEMPERATURE: float = setting(0.07, gt=0)  # votes weighted by exp(cosine / T)
    FEATURE: str = setting("res5avg", choices=FEATURES)  # res5avg and the others flattened

    def check(self, path: str) -> None:
        require(
            len(self.K) >= 1 and all(isinstance(v, int) and v >= 1 for v in self.K),
            f"{path}.K must be a non-empty list of positive integers, got {self.K}",
        )


@dataclass
class LowShot:  # ours: VISSL's 1% / 10% benchmarks as a seeded per-class fraction (lowshot.py)
    FRACTION: float = setting(
        1.0, gt=0, le=1
    )  # of each class of the train split kept for the heads and kNN bank
    SEED: int = 0  # which images: the same for a given (SEED, class) on every rank and run


@dataclass
class BenchmarkConfig:
    VERBOSE: bool = setting(False, vissl_only=True)
    LOG_FREQUENCY: int = setting(100, ge=1)  # steps between log lines of the linear training
    # VISSL's: test the heads on val after every N-th epoch (and always after the last); the
    # report gives each head's last-epoch accuracy and its best tested epoch
    TEST_EVERY_NUM_EPOCH: int = setting(1, ge=1)
    SEED_VALUE: int = 0
    MACHINE: Machine = field(default_factory=Machine)
    DATA: Data = field(default_factory=_data)
    MODEL: BenchmarkModel = field(default_factory=BenchmarkModel)
    OPTIMIZER: Optimizer = field(default_factory=_optimizer)
    KNN: Knn = field(default_factory=Knn)
    LOW_SHOT: LowShot = field(default_factory=LowShot)
    DISTRIBUTED: Distributed = field(default_factory=Distributed)
    OUTPUT_DIR: str = "./runs/benchmark"  # ours: metrics.json and the reports go here (fsspec URL)
    PRETRAIN_METRICS: str = ""  # ours: the pretraining run's metrics.jsonl (loss curve); '' = none
    BASELINE_RANDOM: bool = False  # ours: also evaluate a randomly initialised trunk
    # VISSL's TensorBoard keys; LOG_DIR "." is OUTPUT_DIR; written when the benchmark ends
    HOOKS: Hooks = field(default_factory=Hooks)
