"""Throughput against VISSL, alternating on this machine (a measurement, never a test):

    python tests/bench/vissl_peer.py --script PATH/run.sh [pirl throughput options]

`--script` runs the reference implementation (VISSL 0.1.6 on its own entry point and config)
with the environment BATCH, ITERS, NUM_NEG, DEPTH and OUT, and writes OUT/summary.json with at
least `images_per_s` and `median_s_per_iter`. Each round runs ours (`pirl throughput`'s
`time_steps`, every variant) then the script with the same trunk, batch and negatives, and the
summary gives images/s ours/VISSL per variant, as the median over rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pirl import config
from pirl.tools import throughput


def run_peer(script: Path, batch: int, iters: int, num_negatives: int, depth: int) -> dict:
    """The reference implementation through its own script; returns its summary."""
    out = (
        Path(os.environ.get("PIRL_PEER_OUT", "/tmp/vissl-peer/results"))
        / f"bench-{int(time.time())}"
    )
    env = dict(
        os.environ,
        BATCH=str(batch),
        ITERS=str(iters),
        NUM_NEG=str(num_negatives),
        DEPTH=str(depth),
        OUT=str(out),
    )
    subprocess.run(["bash", str(script)], env=env, check=True)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str]) -> int:
    parser = throughput.parser()
    parser.prog = "tests/bench/vissl_peer.py"
    parser.add_argument("--script", type=Path, required=True, help="the VISSL run script")
    args = parser.parse_args(argv)
    if not args.script.exists():
        parser.error(f"--script {args.script} does not exist")
    overrides, variants = throughput.variants_of(args)
    depth = config.load(overrides, 1)[0].MODEL.TRUNK.RESNETS.DEPTH
    rounds, peer = [], []
    for _ in range(args.rounds):
        results = {}
        for name, extra in variants.items():
            results[name] = throughput.time_steps(overrides + extra, args.steps, args.warmup)
            throughput.print_table(results[name])
        rounds.append(results)
        first = results["default"]
        iters = args.steps + args.warmup
        peer.append(run_peer(args.script, first["batch"], iters, first["num_negatives"], depth))
    rows = throughput.summarise(rounds)
    for row in rows:
        ratios = [
            r[row["variant"]]["images_per_sec"] / p["images_per_s"]
            for r, p in zip(rounds, peer, strict=True)
        ]
        row["ratio_vs_peer"], row["ratios_vs_peer"] = statistics.median(ratios), ratios
    throughput.print_summary(rows, len(rounds))
    for row in rows:
        print(f"{row['variant']}: ours/VISSL images/s {row['ratio_vs_peer']:.2f}x")
    steps = [p["median_s_per_iter"] for p in peer]
    print(f"VISSL s/iter per round: {', '.join(f'{x:.3f}' for x in steps)}")
    if args.json:
        summary = {"summary": rows, "rounds": rounds, "peer": peer}
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
