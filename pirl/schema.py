"""The typed config schema: every key the trainer reads, with VISSL's names and defaults.

Keys keep the meaning they have in VISSL (`vissl/config/defaults.yaml`); the presets under
`pirl/configs/config/` override them exactly as VISSL's YAML files do. A few keys are ours
and say so in their comment. Anything not listed here is an error (see `pirl.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AutoLRScaling:
    auto_scale: bool = False
    base_value: float = 0.1
    base_lr_batch_size: int = 256
    scaling_type: str = "linear"  # linear | sqrt


@dataclass
class LRSchedule:
    auto_lr_scaling: AutoLRScaling = field(default_factory=AutoLRScaling)
    name: str = "multistep"  # cosine | multistep | linear | constant
    start_value: float = 0.1  # cosine, linear
    end_value: float = 0.0  # cosine, linear
    values: list[float] = field(default_factory=lambda: [0.1, 0.01, 0.001])  # multistep
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # multistep (epochs)
    value: float = 0.1  # constant
    update_interval: str = "epoch"  # epoch | step


@dataclass
class ParamSchedulers:
    lr: LRSchedule = field(default_factory=LRSchedule)


@dataclass
class Optimizer:
    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    regularize_bn: bool = False
    regularize_bias: bool = True
    num_epochs: int = 90
    param_schedulers: ParamSchedulers = field(default_factory=ParamSchedulers)
    use_fused: bool = False  # ours: fused SGD kernel (GPU only)


@dataclass
class DataLimitSampling:
    # DATA_LIMIT takes a random subset seeded by SEED (folders, file lists); on `pirl prep` shards,
    # whose samples are already in a seeded random order, it takes the first DATA_LIMIT of them.
    SEED: int = 0
    IS_BALANCED: bool = False  # VISSL's per-class balancing: not supported (refused if true)
    SKIP_NUM_SAMPLES: int = 0  # VISSL's offset into the subset: not supported (refused if set)


@dataclass
class DataSplit:
    DATA_SOURCES: list[str] = field(default_factory=lambda: ["disk_folder"])
    DATASET_NAMES: list[str] = field(default_factory=lambda: ["imagenet1k_folder"])
    # disk_folder: an ImageFolder root (class sub-folders); disk_filelist: a .npy of image paths
    # (VISSL's); shards: a dataset made by `pirl prep` (its root URL, or its manifest.json);
    # synthetic: unused. Paths may be fsspec URLs.
    DATA_PATHS: list[str] = field(default_factory=list)
    DATA_LIMIT: int = -1
    DATA_LIMIT_SAMPLING: DataLimitSampling = field(default_factory=DataLimitSampling)
    BATCHSIZE_PER_REPLICA: int = 256
    LABEL_TYPE: str = "sample_index"  # sample_index | standard
    LABEL_SOURCES: list[str] = field(default_factory=list)
    LABEL_PATHS: list[str] = field(default_factory=list)  # disk_filelist: the labels' .npy
    REMOVE_IMG_PATH_PREFIX: str = ""  # disk_filelist: rewrite this prefix of every image path...
    NEW_IMG_PATH_PREFIX: str = ""  # ...to this one
    COLLATE_FUNCTION: str = "default_collate"  # default_collate | patch_and_image_collator
    INPUT_KEY_NAMES: list[str] = field(default_factory=lambda: ["data"])
    TARGET_KEY_NAMES: list[str] = field(default_factory=lambda: ["label"])
    TRANSFORMS: list[Any] = field(default_factory=list)
    DROP_LAST: bool = False
    MMAP_MODE: bool = True
    COPY_TO_LOCAL_DISK: bool = False
    SPLIT: str = "train"  # ours: which split of a sharded dataset (train | val)
    SYNTHETIC_NUM_SAMPLES: int = 512  # ours: length of the `synthetic` source
    SYNTHETIC_IMAGE_SIZE: int = 64  # ours: side of the `synthetic` source's images
    SHUFFLE_BUFFER: int = 1000  # ours: shards source, bounded shuffle buffer per worker
    CACHE_DIR: str = ""  # ours: shards source, local cache folder for remote shards ("" = none)
    # ours: loader workers hand over undecoded images; decode (nvJPEG on GPU) and TRANSFORMS run
    # batched on the training device (pirl/device_transforms.py)
    TRANSFORMS_ON_DEVICE: bool = False


@dataclass
class Data:
    NUM_DATALOADER_WORKERS: int = 4
    PIN_MEMORY: bool = True
    TRAIN: DataSplit = field(default_factory=DataSplit)
    TEST: DataSplit = field(default_factory=lambda: DataSplit(SPLIT="val"))
    # ours: VISSL's dataset_catalog.json (path or URL) that maps DATASET_NAMES to paths when
    # DATA_PATHS is empty; "" = the file named by $PIRL_DATASET_CATALOG, if set (data/catalog.py)
    DATASET_CATALOG: str = ""


@dataclass
class ResNets:
    DEPTH: int = 50
    WIDTH_MULTIPLIER: int = 1
    NORM: str = "BatchNorm"
    GROUPS: int = 1
    WIDTH_PER_GROUP: int = 64
    ZERO_INIT_RESIDUAL: bool = False
    LAYER4_STRIDE: int = 2
    # ours: pytorch_default (VISSL's trunk: PyTorch's own layer init) | kaiming_fan_out
    # (torchvision's ResNet init); see pirl.models.ResNetTrunk
    INIT: str = "pytorch_default"


@dataclass
class Trunk:
    NAME: str = "resnet"
    RESNETS: ResNets = field(default_factory=ResNets)


@dataclass
class Head:
    # One entry per model output; each entry is a list of [module_name, {kwargs}] pairs.
    PARAMS: list[Any] = field(default_factory=list)
    PARAMS_MULTIPLIER: float = 1.0


@dataclass
class AmpParams:
    USE_AMP: bool = False
    AMP_TYPE: str = "apex"  # VISSL's apex O1 maps to torch.autocast here
    AMP_ARGS: dict[str, Any] = field(default_factory=lambda: {"opt_level": "O1"})
    AMP_DTYPE: str = "bfloat16"  # ours: bfloat16 | float16 (autocast dtype; bfloat16 on CPU too)


@dataclass
class SyncBNConfig:
    CONVERT_BN_TO_SYNC_BN: bool = False
    SYNC_BN_TYPE: str = "pytorch"
    GROUP_SIZE: int = -1


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
    num_negatives: int = 16000
    type: str = "random"  # random (per sample, as VISSL) | shared (ours: one set per step)
    exclude_positive: bool = False  # ours: VISSL lets a negative hit the positive (~2.5% at 32k)


@dataclass
class MemoryParams:
    memory_size: int = -1
    embedding_dim: int = 128
    momentum: float = 0.5  # weight of the OLD row: m <- normalise(momentum*m + (1-momentum)*v)
    norm_init: bool = True
    update_mem_on_forward: bool = True
    # ours: broadcast (rank 0's bank) | average (VISSL's: the ranks' own banks averaged, rows of
    # norm ~1/sqrt(W), so NCE's fixed Z is 0.68x broadcast's at W=2; see MemoryBank.sync)
    init_sync: str = "broadcast"
    duplicate_update: str = (
        "last"  # ours: last | mean; what one gathered update does with a repeated index
    )
    dtype: str = "float32"  # ours: float32 | float16 | bfloat16 bank storage


@dataclass
class NceLossWithMemory:
    loss_type: str = "nce"  # nce (binary NCE with Z) | cross_entropy (InfoNCE)
    norm_embedding: bool = True
    temperature: float = 0.07
    loss_weights: list[float] = field(default_factory=lambda: [1.0])
    norm_constant: float = -1.0
    update_mem_with_emb_index: int = -100
    ignore_index: int = -1
    negative_sampling_params: NegativeSamplingParams = field(default_factory=NegativeSamplingParams)
    memory_params: MemoryParams = field(default_factory=MemoryParams)
    num_train_samples: int = -1


@dataclass
class Loss:
    name: str = "nce_loss_with_memory"
    nce_loss_with_memory: NceLossWithMemory = field(default_factory=NceLossWithMemory)


@dataclass
class Distributed:
    BACKEND: str = "nccl"  # nccl on GPUs; gloo is used automatically on CPU
    NUM_NODES: int = 1
    NUM_PROC_PER_NODE: int = 8
    INIT_METHOD: str = "tcp"
    RUN_ID: str = "auto"
    NCCL_DEBUG: bool = False
    BROADCAST_BUFFERS: bool = True
    TIMEOUT_SECONDS: int = 1800  # ours: collective timeout, so a hung peer fails the job


@dataclass
class Checkpoint:
    DIR: str = "."
    AUTO_RESUME: bool = True
    CHECKPOINT_FREQUENCY: int = 1  # epochs
    CHECKPOINT_ITER_FREQUENCY: int = -1  # steps; -1 = only at epoch ends
    KEEP_LAST: int = 3  # ours: complete checkpoints kept (older ones are deleted)


@dataclass
class Machine:
    DEVICE: str = "auto"  # gpu | cpu | auto (ours: gpu when one is visible)


@dataclass
class Meters:
    name: str = ""


@dataclass
class Trainer:
    TRAIN_STEP_NAME: str = "standard_train_step"


@dataclass
class TensorboardSetup:
    # Event files (pirl/tensorboard.py) go to LOG_DIR/EXPERIMENT_LOG_DIR, either an fsspec URL;
    # LOG_DIR "." is the run's folder (CHECKPOINT.DIR; OUTPUT_DIR for `pirl benchmark`), and an
    # absolute EXPERIMENT_LOG_DIR (/path or scheme://...) is used as it is.
    USE_TENSORBOARD: bool = False
    LOG_DIR: str = "."
    EXPERIMENT_LOG_DIR: str = "tensorboard"
    FLUSH_EVERY_N_MIN: float = 5  # copy the event files to the destination this often
    LOG_PARAMS: bool = True  # parameter histograms...
    LOG_PARAMS_GRADIENTS: bool = True  # ...and gradient histograms...
    LOG_PARAMS_EVERY_N_ITERS: int = 310  # ...every N steps and at epoch ends (-1: epoch ends only)


@dataclass
class Hooks:
    TENSORBOARD_SETUP: TensorboardSetup = field(default_factory=TensorboardSetup)


@dataclass
class Config:
    VERBOSE: bool = False
    LOG_FREQUENCY: int = 100
    TEST_ONLY: bool = False
    TEST_MODEL: bool = False
    SEED_VALUE: int = 0
    MULTI_PROCESSING_METHOD: str = "forkserver"
    MAX_STEPS: int = -1  # ours: stop after this many optimizer steps in total (-1 = no limit)
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
