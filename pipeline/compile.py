"""`python -m pipeline.compile [--image IMAGE] [--output FILE]`: write the pipeline's YAML.

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
    path: str | Path = OUTPUT, image: str = IMAGE, small_image: str | None = None
) -> Path:
    compiler.Compiler().compile(build_pipeline(image, small_image), str(path))
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
    parser.add_argument("--output", default=str(OUTPUT), help="where to write the YAML")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(compile_pipeline(args.output, args.image, args.cpu_image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
