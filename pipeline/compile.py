"""`python -m pipeline.compile [--image IMAGE] [--cpu-image IMAGE] [--no-step-storage-refs]
[--output FILE]`: write the pipeline's YAML.

The committed pipeline/pirl_pipeline.yaml is this command's output with the defaults; a test
fails when it differs from a fresh compile. Upload it with
`kfp pipeline create -p pirl-pretrain pipeline/pirl_pipeline.yaml`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kfp import compiler

from pipeline.components import IMAGE
from pipeline.pipeline import build_pipeline

OUTPUT = Path(__file__).with_name("pirl_pipeline.yaml")


def compile_pipeline(
    path: str | Path = OUTPUT,
    image: str = IMAGE,
    small_image: str | None = None,
    step_storage_refs: bool = True,
) -> Path:
    pipeline = build_pipeline(image, small_image, step_storage_refs=step_storage_refs)
    compiler.Compiler().compile(pipeline, str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compile", description=__doc__)
    parser.add_argument(
        "--image", default=IMAGE, help=f"default of bench_image (and the pods'; default {IMAGE})"
    )
    parser.add_argument(
        "--cpu-image",
        default=None,
        help="default of data_image, the image of prep and the launcher (default: --image + '-cpu')",
    )
    parser.add_argument(
        "--no-step-storage-refs",
        action="store_true",
        help="the steps get no storage Secret/ConfigMap (pods that reach the store through their "
        "identity); data_storage_secret and data_storage_config_map default to '' (none)",
    )
    parser.add_argument("--output", default=str(OUTPUT), help="where to write the YAML")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    refs = not args.no_step_storage_refs
    print(compile_pipeline(args.output, args.image, args.cpu_image, step_storage_refs=refs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
