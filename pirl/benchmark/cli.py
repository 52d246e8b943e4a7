"""The command line: parse, compose the config, set up the ranks, run, write the reports."""

from __future__ import annotations

import argparse
import logging
import sys

from pirl import dist, storage
from pirl.benchmark import config
from pirl.config import check_world_size, override_parser
from pirl.entry import run_main, start
from pirl.errors import PirlError
from pirl.tensorboard import TensorBoardLog, add_benchmark

log = logging.getLogger("pirl")


def parse_args(argv: list[str]) -> argparse.Namespace:
    return override_parser(
        "pirl benchmark",
        "Linear evaluation and kNN of a frozen trunk, e.g. config=benchmark/"
        "linear_image_classification/demo/eval_resnet18_demo_linear "
        "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=runs/pirl_demo/trunk.safetensors",
        "Hydra overrides: config=<preset>, config.KEY=VALUE",
    ).parse_intermixed_args(argv)


def _hint(overrides: list[str]) -> str:
    presets = [o.split("=", 1)[1] for o in overrides if o.startswith("config=")]
    if presets and not presets[-1].startswith("benchmark/"):
        return f" (config={presets[-1]} is not a benchmark preset: use config=benchmark/...)"
    return ""


def run(args: argparse.Namespace) -> int:
    try:
        cfg, derived = config.load(args.overrides, world_size=args.world_size)
    except PirlError as exc:
        exc.args = (f"{exc}{_hint(args.overrides)}",)
        raise
    if args.dry_run:
        sys.stdout.write(config.dump_yaml(cfg, derived))
        return 0
    from pirl.benchmark.report import read_pretraining, text_table, write_reports
    from pirl.benchmark.run import benchmark

    dcfg = cfg.DISTRIBUTED
    env = start(cfg.MACHINE.DEVICE, dcfg.TIMEOUT_SECONDS, dcfg.BACKEND)
    check_world_size(cfg, env.world_size)  # the launch against NUM_NODES x NUM_PROC_PER_NODE
    for note in derived.notes:
        log.info("config: %s", note)
    tb = None
    if env.is_main:
        storage.check_writable(cfg.OUTPUT_DIR)
        tb = TensorBoardLog.open(cfg.HOOKS.TENSORBOARD_SETUP, cfg.OUTPUT_DIR)
    metrics = benchmark(cfg, derived, env)
    if env.is_main:
        pretraining = read_pretraining(cfg.PRETRAIN_METRICS)
        urls = write_reports(cfg.OUTPUT_DIR, metrics, pretraining)
        if tb:
            add_benchmark(tb, metrics)
            tb.close()
        sys.stdout.write(text_table(metrics))
        log.info("wrote %s", ", ".join(urls))
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("pirl benchmark", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
