"""The project's main job on one machine: the whole `pirl-pretrain` Kubeflow pipeline, locally.

`make demo` (= `python -m pirl.demo`) writes a demo image set (pirl.data.demo: generated shapes
by default) as an image folder and runs the pipeline with `kfp.local` (SubprocessRunner, this
interpreter): `prep` shards the images, `train` runs the very PyTorchJob it would submit to a
cluster (Master + 1 Worker, one CPU process each) as local processes with the operator's
environment, `benchmark` evaluates the trained trunk against a random-init one. It ends by
printing the pretraining loss and representation health per epoch and the benchmark table.

    python -m pirl.demo [--method npid|pirl] [--dataset shapes|digits] [--epochs N]
                        [--train-override K=V ...] [--backend pytorchjob|trainjob]
                        [--output DIR_OR_URL] [--work DIR]

--output takes fsspec URLs too (s3://bucket/demo with AWS_* in the environment): the dataset,
checkpoints and reports go there. The source images and KFP's local pipeline root stay in --work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_PRESETS = {
    "npid": "pretrain/npid/npid_demo_resnet18",
    "pirl": "pretrain/pirl/pirl_demo_resnet18",
}
DEFAULT_METHOD = "npid"
DEMO_BENCHMARK = "benchmark/linear_image_classification/demo/eval_resnet18_demo_linear"


def demo_arguments(
    source: str,
    output: str,
    epochs: int | None = None,
    extra: list[str] | None = None,
    backend: str = "pytorchjob",
    method: str = DEFAULT_METHOD,
) -> dict:
    """The run parameters that turn the 4 x 8-GPU defaults into the 2-replica CPU demo, as a
    PyTorchJob or (backend="trainjob") a TrainJob."""
    overrides = [f"config.OPTIMIZER.num_epochs={epochs}"] if epochs else []
    overrides += extra or []
    return {
        "data_source": source,
        "data_dataset_url": f"{output.rstrip('/')}/dataset",
        "data_workers": 2,
        "data_cpu": "",
        "data_memory": "",
        "train_config": DEMO_PRESETS[method],
        "train_overrides": overrides,
        "train_num_nodes": 2,
        "train_nproc_per_node": 1,
        "train_gpus_per_node": 0,
        "train_cpu_request": "",
        "train_cpu_limit": "",
        "train_memory_request": "",
        "train_memory_limit": "",
        "train_shm_size": "",
        "train_tolerations": [],
        "train_env": {"OMP_NUM_THREADS": "1"},  # 2 pods x 1 thread on 2 cores
        "train_output_root": f"{output.rstrip('/')}/runs",
        "train_active_deadline_seconds": 1800,
        "train_launcher": "local",
        "train_backend": backend,
        "bench_config": DEMO_BENCHMARK,
        "bench_baseline_random": True,
        "bench_gpus": 0,
        "bench_cpu": "",
        "bench_memory": "",
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pirl.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--output", default="runs/demo", help="dataset, checkpoints and reports (path or URL)"
    )
    parser.add_argument(
        "--work", default="runs/demo", help="local: source images and KFP's pipeline root"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="pretraining epochs (default: the preset's)"
    )
    parser.add_argument(
        "--method",
        choices=sorted(DEMO_PRESETS),
        default=DEFAULT_METHOD,
        help=f"the pretraining preset: {DEMO_PRESETS} (default: {DEFAULT_METHOD})",
    )
    parser.add_argument(
        "--dataset",
        choices=("shapes", "digits"),
        default="shapes",
        help="the demo image set (pirl.data.demo; default: shapes)",
    )
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pretraining config override (repeatable), e.g. "
        "config.LOSS.nce_loss_with_memory.memory_params.dtype=float16",
    )
    parser.add_argument(
        "--backend",
        choices=("pytorchjob", "trainjob"),
        default="pytorchjob",
        help="run the training step's PyTorchJob (Training Operator v1) or TrainJob (Kubeflow "
        "Trainer v2) locally",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import logging

    from pirl import config, storage
    from pirl.data.demo import write_demo_folder
    from pirl.errors import PirlError
    from pirl.extras import need

    arguments = demo_arguments("", "", args.epochs, args.train_override, method=args.method)
    nodes, procs = arguments["train_num_nodes"], arguments["train_nproc_per_node"]
    try:  # a missing extra or a bad override fails here, before any pipeline step runs
        local = need("kfp.local", "demo", "the demo (a local run of the KFP pipeline)")
        if args.dataset == "digits":
            need("sklearn", "demo", "the digits demo set")
        config.load(
            [
                f"config={DEMO_PRESETS[args.method]}",
                f"config.DISTRIBUTED.NUM_NODES={nodes}",
                f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}",
                *arguments["train_overrides"],
            ],
            world_size=nodes * procs,
        )
    except PirlError as exc:
        print(f"pirl demo: {exc}", file=sys.stderr)
        return exc.exit_code
    work = Path(args.work).resolve()
    output = args.output if "://" in args.output else str(Path(args.output).resolve())
    source = work / args.dataset
    write_demo_folder(args.dataset, str(source))
    from pipeline.pipeline import pirl_pretrain  # needs kfp: imported once `need` found it

    logging.getLogger("kfp").setLevel(logging.WARNING)  # "resources have no effect locally", etc.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "kfp"))
    try:
        run = pirl_pretrain(
            **demo_arguments(
                str(source), output, args.epochs, args.train_override, args.backend, args.method
            )
        )
    except RuntimeError as exc:
        print(f"pirl demo: the pipeline failed: {exc}", file=sys.stderr)
        return 1
    report = run.output
    out_dir = report.metadata.get("output_dir", "")
    metrics = json.loads(storage.read_bytes(storage.join(out_dir, "metrics.json")))
    try:
        from pirl.benchmark.report import text_table

        table = text_table(metrics)
    except (ImportError, KeyError, TypeError, ValueError):
        table = json.dumps(metrics.get("headline", metrics), indent=1) + "\n"
    print(f"\npirl demo: reports in {out_dir} (report.md, report.html, metrics.json)\n")
    print_pretraining(metrics.get("config", {}).get("PRETRAIN_METRICS", ""))
    sys.stdout.write(table)
    return 0


def print_pretraining(metrics_url: str) -> None:
    """Mean pretraining loss and representation health per epoch (pirl.health), from the
    training run's metrics.jsonl."""
    from pirl.benchmark.report import read_pretraining

    epochs = read_pretraining(metrics_url).epochs
    if not epochs:
        return
    print("pretraining: epoch  mean loss  loss/chance  bank mean cos  alignment  uniformity")
    for r in epochs:
        h = r.get("health", {})
        cells = [
            h.get(k) for k in ("loss_vs_chance", "bank_mean_cosine", "alignment", "uniformity")
        ]
        shown = "".join(f"{c:>13.3f}" if c is not None else f"{'-':>13}" for c in cells)
        print(f"             {r['epoch']:>5}  {r['epoch_loss']:>9.4f}{shown}")
    print()


if __name__ == "__main__":
    sys.exit(main())
