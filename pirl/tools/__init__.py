"""Developer tools that measure the trainer; nothing in training imports them.

- `throughput` (`pirl throughput`): timed training steps, per phase, against the machine's peak;
- `scaling` (`python -m pirl.tools.scaling`): predicts multi-rank images/s from one rank's step.
"""
