"""The `pirl-pretrain` Kubeflow pipeline: prep -> PyTorchJob -> benchmark.

Modules, each with one job:
- `pytorchjob`: build the PyTorchJob (`kubeflow.org/v1`) from typed parameters; pure, no I/O.
- `launcher`: submit it to a cluster, stream the master's log, wait, fail on `Failed`/timeout.
- `local_runner`: run the same spec as local processes, with the env the operator gives each pod.
- `torchrun`: torchrun that exits with the failed worker's code (the `ExitCode` restart contract).
- `steps`: what each pipeline step does (plain functions, testable without KFP).
- `components`, `pipeline`, `compile`: the KFP components, the pipeline, the committed YAML.
"""
