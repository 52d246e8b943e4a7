"""`pirl benchmark <overrides> [--dry-run]` (also `python -m pirl.benchmark`): linear evaluation and
kNN of a frozen trunk, against a random-init baseline when asked, with metrics.json and reports.

    pirl benchmark config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear \
        config.MODEL.WEIGHTS_INIT.PARAMS_FILE=s3://bucket/runs/pirl/trunk.safetensors \
        config.DATA.TRAIN.DATA_PATHS=[s3://bucket/imagenet] config.OUTPUT_DIR=s3://bucket/bench/pirl

Runs as one process or under torchrun (same contract as `pirl train`); see pirl/benchmark/schema.py
for the keys, and run.py for what a run does.
"""

from pirl.benchmark.cli import main

__all__ = ["main"]
