"""The typed config schema: every key the trainer reads, with VISSL's names and defaults.

Keys keep the meaning they have in VISSL (`vissl/config/defaults.yaml`); the presets under
`pirl/configs/config/` override them exactly as VISSL's YAML files do. A few keys are ours
and say so in their comment. Anything not listed here is an error (see `pirl.config`).

A field's rule sits beside it (`setting(...)`: allowed values, bounds, `vissl_only` for keys kept
only so VISSL's YAML loads, which warn when set); rules between the fields of one section are
its `check(path)`. `pirl.fields.check_tree` applies both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pirl.fields import require, setting

TRUNK_DEPTHS = {
    18: "basic",
    34: "basic",
    50: "bottleneck",
    101: "bottleneck",
    152: "bottleneck",
    200: "bottleneck",
}
WIDTH_MULTIPLIERS = (1, 2, 3, 4)
TRUNK_INITS = ("pytorch_default", "kaiming_fan_out")  # see pirl.models.ResNetTrunk
DATA_SOURCES = ("disk_folder", "disk_filelist", "shards", "synthetic")
COLLATORS = ("default_collate", "patch_and_image_collator")
LR_SCHEDULES = ("cosine", "multistep", "linear", "constant")
# Sanity bound: far above any real run (the seed's largest: batch 32 per GPU), low enough that a
# typo (an extra zero or ten) is an error instead of a run that overflows.
MAX_BATCH_PER_REPLICA = 65536


@dataclass
class AutoLRScaling:
    auto_scale: bool = False
    base_value: float = 0.1
    base_lr_batch_size: int = setting(256, ge=1)
    scaling_type: str = setting("linear", choices=("linear", "sqrt"))


@dataclass
class LRSchedule:
    auto_lr_scaling: AutoLRScaling = field(default_factory=AutoLRScaling)
    name: str = setting("multistep", choices=LR_SCHEDULES)
    start_value: float = 0.1  # cosine, linear
    end_value: float = 0.0  # cosine, linear
    values: list[float] = field(default_factory=lambda: [0.1, 0.01, 0.001])  # multistep
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # multistep (epochs)
    value: float = 0.1  # constant
    update_interval: str = setting("epoch", choices=("epoch", "step"))

    def check(self, path: str) -> None:
        if self.name == "multistep":
            require(
                len(self.values) == len(self.milestones) + 1,
                f"{path}.values needs one more entry than milestones, got {len(self.values)} "
                f"values and {len(self.milestones)} milestones",
            )
            require(
                self.milestones == sorted(self.milestones), f"{path}.milestones must be increasing"
            )
        if self.name == "cosine":
            require(self.start_value > 0, f"{path}.start_value must be > 0 for the cosine schedule")


@dataclass
class ParamSchedulers:
    lr: LRSchedule = field(default_factory=LRSchedule)


@dataclass
class Optimizer:
    name: str = setting("sgd", choices=("sgd",))
    momentum: float = setting(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = setting(1e-4, ge=0)
    regularize_bn: bool = False
    regularize_bias: bool = True
    num_epochs: int = setting(90, ge=1)
    param_schedulers: ParamSchedulers = field(default_factory=ParamSchedulers)
    use_fused: bool = False  # ours: fused SGD kernel (GPU only)

    def check(self, path: str) -> None:
        require(
            not self.nesterov or self.momentum > 0,
            f"{path}.nesterov needs momentum > 0 (torch's SGD rule)",
        )


@dataclass
class DataLimitSampling:
    # DATA_LIMIT takes a random subset seeded by SEED (folders, file lists); on `pirl prep` shards,
    # whose samples are already in a seeded random order, it takes the first DATA_LIMIT of them.
    SEED: int = 0
    IS_BALANCED: bool = False  # VISSL's per-class balancing: not supported (refused if true)
    SKIP_NUM_SAMPLES: int = 0  # VISSL's offset into the subset: not supported (refused if set)

    def check(self, path: str) -> None:
        require(
            not self.IS_BALANCED,
            f"{path}.IS_BALANCED=true (a class-balanced subset) is not supported: set it to "
            "false for a uniform random subset",
        )
        require(
            self.SKIP_NUM_SAMPLES == 0,
            f"{path}.SKIP_NUM_SAMPLES is not supported: remove it (DATA_LIMIT draws its subset "
            "at random, seeded by DATA_LIMIT_SAMPLING.SEED)",
        )


@dataclass
class DataSplit:
    DATA_SOURCES: list[str] = setting(factory=lambda: ["disk_folder"], choices=DATA_SOURCES)
    DATASET_NAMES: list[str] = setting(factory=lambda: ["imagenet1k_folder"], vissl_only=True)
    # disk_folder: an ImageFolder root (class sub-folders); disk_filelist: a .npy of image paths
    # (VISSL's); shards: a dataset made by `pirl prep` (its root URL, or its manifest.json);
    # synthetic: unused. Paths may be fsspec URLs.
    DATA_PATHS: list[str] = field(default_factory=list)
    DATA_LIMIT: int = -1  # -1: all
    DATA_LIMIT_SAMPLING: DataLimitSampling = field(default_factory=DataLimitSampling)
    BATCHSIZE_PER_REPLICA: int = setting(256, ge=1, le=MAX_BATCH_PER_REPLICA)
    LABEL_TYPE: str = setting("sample_index", choices=("sample_index", "standard"))
    LABEL_SOURCES: list[str] = setting(factory=list, vissl_only=True)
    LABEL_PATHS: list[str] = field(default_factory=list)  # disk_filelist: the labels' .npy
    REMOVE_IMG_PATH_PREFIX: str = ""  # disk_filelist: rewrite this prefix of every image path...
    NEW_IMG_PATH_PREFIX: str = ""  # ...to this one
    COLLATE_FUNCTION: str = setting("default_collate", choices=COLLATORS)
    INPUT_KEY_NAMES: list[str] = field(default_factory=lambda: ["data"])
    TARGET_KEY_NAMES: list[str] = setting(factory=lambda: ["label"], vissl_only=True)
    TRANSFORMS: list[Any] = field(default_factory=list)
    DROP_LAST: bool = False
    MMAP_MODE: bool = True
    COPY_TO_LOCAL_DISK: bool = setting(False, vissl_only=True)
    SPLIT: str = "train"  # ours: which split of a sharded dataset (train | val)
    SYNTHETIC_NUM_SAMPLES: int = 512  # ours: length of the `synthetic` source
    SYNTHETIC_IMAGE_SIZE: int = 64  # ours: side of the `synthetic` source's images
    SHUFFLE_BUFFER: int = 1000  # ours: shards source, bounded shuffle buffer per worker
    CACHE_DIR: str = ""  # ours: shards source, local cache folder for remote shards ("" = none)
    # ours: loader workers hand over undecoded images; decode (nvJPEG on GPU) and TRANSFORMS run
    # batched on the training device (pirl/device_transforms.py)
    TRANSFORMS_ON_DEVICE: bool = False

    def check(self, path: str) -> None:
        require(
            len(self.DATA_SOURCES) == 1,
            f"{path}.DATA_SOURCES must name exactly one source, got {self.DATA_SOURCES}",
        )
        require(
            self.DATA_LIMIT == -1 or self.DATA_LIMIT >= 1,
            f"{path}.DATA_LIMIT must be -1 (all) or >= 1, got {self.DATA_LIMIT}",
        )
        require(
            self.DATA_LIMIT < 0
            or self.DATA_SOURCES[0] != "shards"
            or self.DATA_LIMIT_SAMPLING.SEED == 0,
            f"{path}.DATA_LIMIT_SAMPLING.SEED={self.DATA_LIMIT_SAMPLING.SEED}: on shards, "
            "DATA_LIMIT takes the first samples of the dataset's own random order (set by "
            "`pirl prep --seed`); for another subset re-run prep with another --seed, or remove "
            "DATA_LIMIT_SAMPLING.SEED",
        )
        if self.COLLATE_FUNCTION == "patch_and_image_collator":
            require(
                sorted(self.INPUT_KEY_NAMES) == ["images", "patches"],
                f"{path}.INPUT_KEY_NAMES must be [patches, images] with patch_and_image_collator, "
                f"got {self.INPUT_KEY_NAMES}",
            )


@dataclass
class Data:
    NUM_DATALOADER_WORKERS: int = setting(4, ge=0)
    PIN_MEMORY: bool = True
    TRAIN: DataSplit = field(default_factory=DataSplit)
    TEST: DataSplit = field(default_factory=lambda: DataSplit(SPLIT="val"))
    # ours: VISSL's dataset_catalog.json (path or URL) that maps DATASET_NAMES to paths when
    # DATA_PATHS is empty; "" = the file named by $PIRL_DATASET_CATALOG, if set (data/catalog.py)
    DATASET_CATALOG: str = ""


@dataclass
class ResNets:
    DEPTH: int = setting(50, choices=tuple(TRUNK_DEPTHS))
    WIDTH_MULTIPLIER: int = setting(1, choices=WIDTH_MULTIPLIERS)
    NORM: str = setting("BatchNorm", choices=("BatchNorm",))
    GROUPS: int = setting(1, ge=1)
    WIDTH_PER_GROUP: int = setting(64, ge=1)
    ZERO_INIT_RESIDUAL: bool = False
    LAYER4_STRIDE: int = setting(2, choices=(1, 2))
    # ours: pytorch_default (VISSL's trunk: PyTorch's own layer init) | kaiming_fan_out
    # (torchvision's ResNet init); see pirl.models.ResNetTrunk
    INIT: str = setting("pytorch_default", choices=TRUNK_INITS)

    def check(self, path: str) -> None:
        require(
            TRUNK_DEPTHS[self.DEPTH] == "bottleneck"
            or (self.GROUPS == 1 and self.WIDTH_PER_GROUP == 64),
            f"{path}.GROUPS/WIDTH_PER_GROUP (ResNeXt) need a bottleneck depth "
            f"(50/101/152/200), got DEPTH={self.DEPTH}",
        )


@dataclass
class Trunk:
    NAME: str = setting("resnet", choices=("resnet",))
    RESNETS: ResNets = field(default_factory=ResNets)


@dataclass
class Head:
    # One entry per model output; each entry is a list of [module_name, {kwargs}] pairs.
    PARAMS: list[Any] = field(default_factory=list)
    PARAMS_MULTIPLIER: float = 1.0


@dataclass
class AmpParams:
    USE_AMP: bool = False
    AMP_TYPE: str = setting("apex", vissl_only=True)  # VISSL's apex O1 is torch.autocast here
    AMP_ARGS: dict[str, Any] = setting(factory=lambda: {"opt_level": "O1"}, vissl_only=True)
    # ours: the autocast dtype (bfloat16 on CPU too)
    AMP_DTYPE: str = setting("bfloat16", choices=("bfloat16", "float16"))


@dataclass
class SyncBNConfig:
    CONVERT_BN_TO_SYNC_BN: bool = False
    SYNC_BN_TYPE: str = setting("pytorch", vissl_only=True)  # torch's SyncBatchNorm always
    GROUP_SIZE: int = setting(-1, vissl_only=True)  # SyncBN spans all ranks


@dataclass
class Model:
    TRUNK: Trunk = field(default_factory=Trunk)
    HEAD: Head = field(default_factory=Head)
    MULTI_INPUT_HEAD_MAPPING: list[Any] = field(default_factory=list)
    AMP_PARAMS: AmpParams = field(default_factory=AmpParams)
    SYNC_BN_CONFIG: SyncBNConfig = field(default_factory=SyncBNConfig)
    # ours: NHWC activations; oneDNN on CPU and cuDNN on GPU run convolutions faster in it
    # (measured 13% per fp32 R50 step on the 2-core CPU; see README Performance)
    CHANNELS_LAST: bool = True
    # ours: torch.compile the model's forward/backward (inductor); the first steps compile
    # (minutes for a ResNet-50), later ones run the fused kernels
    COMPILE: bool = False


@dataclass
class NegativeSamplingParams:
    num_negatives: int = setting(16000, gt=0)
    # random (per sample, as VISSL) | shared (ours: one set per step)
    type: str = setting("random", choices=("random", "shared"))
    exclude_positive: bool = False  # ours: VISSL lets a negative hit the positive (~2.5% at 32k)

    def check(self, path: str) -> None:
        require(
            not (self.exclude_positive and self.type == "shared"),
            f"{path}.exclude_positive needs type=random (shared negatives are one set per step)",
        )


@dataclass
class MemoryParams:
    memory_size: int = -1  # derived: the dataset's length
    embedding_dim: int = setting(128, gt=0)
    # weight of the OLD row: m <- normalise(momentum*m + (1-momentum)*v)
    momentum: float = setting(0.5, ge=0, lt=1)
    norm_init: bool = True
    update_mem_on_forward: bool = True
    # ours: broadcast (rank 0's bank) | average (VISSL's: the ranks' own banks averaged, rows of
    # norm ~1/sqrt(W), so NCE's fixed Z is 0.68x broadcast's at W=2; see MemoryBank.sync)
    init_sync: str = setting("broadcast", choices=("broadcast", "average"))
    # ours: what one gathered update does with a repeated index
    duplicate_update: str = setting("last", choices=("last", "mean"))
    # ours: the bank's storage dtype
    dtype: str = setting("float32", choices=("float32", "float16", "bfloat16"))


@dataclass
class NceLossWithMemory:
    # nce (binary NCE with Z) | cross_entropy (InfoNCE)
    loss_type: str = setting("nce", choices=("nce", "cross_entropy"))
    norm_embedding: bool = True
    temperature: float = setting(0.07, gt=0)
    loss_weights: list[float] = field(default_factory=lambda: [1.0])
    norm_constant: float = -1.0  # > 0: a fixed Z; < 0: Z estimated from the first batch
    update_mem_with_emb_index: int = -100
    ignore_index: int = -1
    negative_sampling_params: NegativeSamplingParams = field(default_factory=NegativeSamplingParams)
    memory_params: MemoryParams = field(default_factory=MemoryParams)
    num_train_samples: int = -1  # derived: the dataset's length

    def check(self, path: str) -> None:
        require(
            self.norm_constant != 0,
            f"{path}.norm_constant must be > 0 (fixed Z) or < 0 (estimate Z from the first "
            "batch), got 0",
        )


@dataclass
class Loss:
    name: str = setting("nce_loss_with_memory", choices=("nce_loss_with_memory",))
    nce_loss_with_memory: NceLossWithMemory = field(default_factory=NceLossWithMemory)


@dataclass
class Distributed:
    # nccl on GPUs (gloo on CPU, which NCCL cannot run); gloo: everywhere
    BACKEND: str = setting("nccl", choices=("nccl", "gloo"))
    NUM_NODES: int = setting(1, ge=1)
    NUM_PROC_PER_NODE: int = setting(8, ge=1)
    INIT_METHOD: str = setting("tcp", vissl_only=True)  # the launcher's env:// rendezvous always
    RUN_ID: str = setting("auto", vissl_only=True)
    NCCL_DEBUG: bool = setting(False, vissl_only=True)  # set NCCL_DEBUG in the pod's env instead
    BROADCAST_BUFFERS: bool = True
    # ours: collective timeout, so a hung peer fails the job
    TIMEOUT_SECONDS: int = setting(1800, ge=1)


@dataclass
class Checkpoint:
    DIR: str = "."
    AUTO_RESUME: bool = True
    CHECKPOINT_FREQUENCY: int = setting(1, ge=1)  # epochs
    CHECKPOINT_ITER_FREQUENCY: int = -1  # steps; -1 = only at epoch ends
    # ours: complete checkpoints kept (older ones are deleted)
    KEEP_LAST: int = setting(3, ge=1)

    def check(self, path: str) -> None:
        require(self.DIR != "", f"{path}.DIR must not be empty")


@dataclass
class Machine:
    # gpu | cpu | auto (ours: gpu when one is visible)
    DEVICE: str = setting("auto", choices=("gpu", "cpu", "auto"))


@dataclass
class Meters:
    name: str = setting("", vissl_only=True)


@dataclass
class Trainer:
    TRAIN_STEP_NAME: str = setting("standard_train_step", vissl_only=True)


@dataclass
class TensorboardSetup:
    # Event files (pirl/tensorboard.py) go to LOG_DIR/EXPERIMENT_LOG_DIR, either an fsspec URL;
    # LOG_DIR "." is the run's folder (CHECKPOINT.DIR; OUTPUT_DIR for `pirl benchmark`), and an
    # absolute EXPERIMENT_LOG_DIR (/path or scheme://...) is used as it is.
    USE_TENSORBOARD: bool = False
    LOG_DIR: str = "."
    EXPERIMENT_LOG_DIR: str = "tensorboard"
    # copy the event files to the destination this often (minutes)
    FLUSH_EVERY_N_MIN: float = setting(5, gt=0)
    LOG_PARAMS: bool = True  # parameter histograms...
    LOG_PARAMS_GRADIENTS: bool = True  # ...and gradient histograms...
    LOG_PARAMS_EVERY_N_ITERS: int = 310  # ...every N steps and at epoch ends (-1: epoch ends only)

    def check(self, path: str) -> None:
        require(
            self.LOG_PARAMS_EVERY_N_ITERS == -1 or self.LOG_PARAMS_EVERY_N_ITERS >= 1,
            f"{path}.LOG_PARAMS_EVERY_N_ITERS must be >= 1, or -1 (at epoch ends only)",
        )
        require(
            self.EXPERIMENT_LOG_DIR != "" and self.LOG_DIR != "",
            f"{path}.LOG_DIR and EXPERIMENT_LOG_DIR must not be empty",
        )
        if self.USE_TENSORBOARD:
            import importlib.util

            require(
                importlib.util.find_spec("tensorboard") is not None,
                f"{path}.USE_TENSORBOARD=true needs the tensorboard package: pip install "
                "'pirl[tensorboard]' (or set it to false)",
            )


@dataclass
class Hooks:
    TENSORBOARD_SETUP: TensorboardSetup = field(default_factory=TensorboardSetup)


@dataclass
class Config:
    VERBOSE: bool = setting(False, vissl_only=True)
    LOG_FREQUENCY: int = setting(100, ge=1)
    TEST_ONLY: bool = setting(False, vissl_only=True)
    TEST_MODEL: bool = setting(False, vissl_only=True)
    SEED_VALUE: int = 0
    MULTI_PROCESSING_METHOD: str = setting("forkserver", vissl_only=True)
    MAX_STEPS: int = (
        -1
    )  # ours: stop after this many optimizer steps in total then save and export (-1: no limit)
    MACHINE: Machine = field(default_factory=Machine)
    DATA: Data = field(default_factory=Data)
    MODEL: Model = field(default_factory=Model)
    LOSS: Loss = field(default_factory=Loss)
    OPTIMIZER: Optimizer = field(default_factory=Optimizer)
    DISTRIBUTED: Distributed = field(default_factory=Distributed)
    CHECKPOINT: Checkpoint = field(default_factory=Checkpoint)
    METERS: Meters = field(default_factory=Meters)
    TRAINER: Trainer = field(default_factory=Trainer)
    HOOKS: Hooks = field(default_factory=Hooks)
