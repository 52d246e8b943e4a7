"""The command line: parse, compose the config, set up the ranks, run, write the reports."""

from __future__ import annotations

import argparse
import logging
import sys

from pirl import dist, storage
from pirl.benchmark import config
from pirl.config import override_parser
from pirl.errors import PirlError
from pirl.redaction import redact
from pirl.tensorboard import TensorBoardLog, add_benchmark
from pirl.train import setup_logging

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
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

        env = dist.init(cfg.MACHINE.DEVICE, cfg.DISTRIBUTED.TIMEOUT_SECONDS)
        setup_logging(env.rank)
        config.derive(cfg, env.world_size)  # the launch against NUM_NODES x NUM_PROC_PER_NODE
        for note in derived.notes:
            log.info("config: %s", note)
        tb = None
        if env.is_main:
            storage.check_writable(cfg.OUTPUT_DIR)
            tb = TensorBoardLog.open(cfg.HOOKS.TENSORBOARD_SETUP, cfg.OUTPUT_DIR)
        try:
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
        finally:
            dist.cleanup()
        return 0
    except PirlError as exc:
        print(redact(f"pirl benchmark: error: {exc}"), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
