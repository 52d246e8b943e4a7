"""The project's main job on this machine: a short PIRL training on the bundled demo images.

`make demo` (= `python -m pirl.demo`) writes scikit-learn's digits as an image folder and trains
the `pretrain/pirl/pirl_demo_resnet18` preset on it, printing the loss per epoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pirl.data.demo import write_digits_folder
from pirl.train import main as train_main


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0] if argv else "runs/demo")
    train_dir, _ = write_digits_folder(str(out / "digits"), size=64)
    rc = train_main(
        [
            "config=pretrain/pirl/pirl_demo_resnet18",
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            f"config.DATA.TRAIN.DATA_PATHS=[{train_dir}]",
            f"config.CHECKPOINT.DIR={out / 'train'}",
        ]
    )
    if rc != 0:
        return rc
    epochs = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    print("\nepoch  mean loss")
    for r in epochs:
        if "epoch_loss" in r:
            print(f"{r['epoch']:>5}  {r['epoch_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
