"""Per-batch class entropy of the training loader: shards (as prep writes them now, and in the
class order older preps wrote) vs the shuffled image folder. A benchmark, not a test.

    python tests/bench/batch_entropy.py [--dataset shapes|digits] [--batch 32] [--epochs 2]

Prints the mean entropy (bits) of the class labels within each batch of epoch 0..E-1; with C
classes in equal numbers a perfectly mixed batch is near log2(C).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections import Counter
from unittest import mock

from pirl import prep
from pirl.data import open_train_data
from pirl.data.demo import write_demo_folder
from pirl.schema import DataSplit
from pirl.transforms import build_transform, collate_single_view


def open_labelled(split: DataSplit):
    """The training loader of `split` (one rank, no workers) with plain tensors, for its labels."""
    return open_train_data(
        split,
        build_transform([{"name": "ToTensor"}]),
        collate_single_view("data"),
        rank=0,
        world=1,
        seed=0,
        num_workers=0,
    )


def mean_batch_entropy(data, epochs: int = 1, max_batches: int | None = None) -> float:
    """Mean entropy (bits) of the class labels within each batch of epochs 0..epochs-1 (at
    most `max_batches` batches per epoch)."""
    entropies = []
    for epoch in range(epochs):
        for i, b in enumerate(data.batches(epoch)):
            if i == max_batches:
                break
            counts = Counter(b["label"].tolist())
            n = sum(counts.values())
            entropies.append(-sum(c / n * math.log2(c / n) for c in counts.values()))
    return sum(entropies) / len(entropies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="shapes", choices=("shapes", "digits"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train, _ = write_demo_folder(args.dataset, f"{tmp}/src")
        opts = prep.Options(shard_size=prep.DEMO_SHARD_SIZE)
        prep.prep(f"{tmp}/src", f"{tmp}/shuffled", opts)
        with mock.patch.object(prep, "iid_order", lambda inputs, seed, split: list(inputs)):
            prep.prep(f"{tmp}/src", f"{tmp}/class-ordered", opts)  # what older preps wrote
        rows = [
            ("shards, seeded random order (prep now)", "shards", f"{tmp}/shuffled"),
            ("shards, class order (prep before)", "shards", f"{tmp}/class-ordered"),
            ("disk_folder (shuffled per epoch)", "disk_folder", train),
        ]
        print(f"{args.dataset}, batch {args.batch}, mean per-batch class entropy (bits):")
        for label, source, path in rows:
            split = DataSplit(
                DATA_SOURCES=[source],
                DATA_PATHS=[path],
                BATCHSIZE_PER_REPLICA=args.batch,
                LABEL_TYPE="standard",
            )
            bits = mean_batch_entropy(open_labelled(split), args.epochs)
            print(f"  {label:<42} {bits:.2f}")


if __name__ == "__main__":
    main()
