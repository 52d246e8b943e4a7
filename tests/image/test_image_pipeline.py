"""The whole `pirl-pretrain` pipeline with KFP's own container runner, kfp.local.DockerRunner,
against podman's Docker API: prep, train (whose PyTorchJob runs as the local operator inside the
train step's container, Master + 1 Worker) and benchmark each in the image, as restricted pods.

Where kfp.local (2.17) differs from a KFP backend, and what the test does about it:
- the step images are run parameters (`data_image`, `bench_image`, set with
  `set_container_image`); a backend substitutes them, kfp.local hands the task handler the
  unresolved placeholder `{{$.inputs.parameters['pipelinechannel--data_image']}}` (its
  task_dispatcher passes `container.image` as compiled) and Docker refuses it as a reference.
  `ResolvedImages` substitutes the run's argument, as the backend does;
- DockerRunner passes the component's command as the container's *arguments* (Docker's `Cmd`),
  so the image's ENTRYPOINT (the torchrun wrapper) would run in front of it, where a pod's
  `command` replaces the ENTRYPOINT: `entrypoint=[""]` (Docker's "no entrypoint") restores the
  pod's behaviour;
- its handler starts the container with `auto_remove=True` and takes a container already gone
  when it asks for the exit code as exit 0 ("We assume success"): under podman the container is
  always gone by then, so a step that exits 2 is reported SUCCESS. `PodmanTaskHandler` keeps
  the container until it has read the exit code;
- it mounts only the pipeline root, at the same path, so the source images and the outputs
  live under it.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from pirl.demo import demo_arguments

from .podman import SHM_SIZE, TMP_SIZE, USER, DockerAPIService

pytestmark = [pytest.mark.image, pytest.mark.slow]

QUICK_TRAIN = [
    "config.OPTIMIZER.num_epochs=1",
    "config.DATA.TRAIN.DATA_LIMIT=256",
    "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=128",
]
QUICK_BENCH = ["config.OPTIMIZER.num_epochs=2"]
CHANNEL = re.compile(r"\{\{\$\.inputs\.parameters\['pipelinechannel--(\w+)'\]\}\}")


def task_handler(arguments: dict):
    """kfp.local's DockerTaskHandler with the two fixes of the module doc: the image placeholder
    replaced by the run's argument, the real exit code of the step's container."""
    import docker
    from kfp.local import status
    from kfp.local.docker_task_handler import DockerTaskHandler

    class PodmanTaskHandler(DockerTaskHandler):
        def __init__(self, image: str, **kwargs):
            super().__init__(image=CHANNEL.sub(lambda m: arguments[m[1]], image), **kwargs)

        def run(self) -> status.Status:
            client = docker.from_env()
            args = dict(self.runner.container_run_args)
            if self.env_vars:
                args["environment"] = self.env_vars
            container = client.containers.run(
                image=self.image,
                command=self.full_command,
                volumes=self.get_volumes_to_mount(client),
                detach=True,
                **args,
            )
            try:
                for line in container.logs(stream=True, follow=True):
                    print(line.decode(errors="replace"), end="")
                code = container.wait()["StatusCode"]
            finally:
                container.remove(force=True)
                client.close()
            print(f"exit code {code}")
            return status.Status.SUCCESS if code == 0 else status.Status.FAILURE

    return PodmanTaskHandler


@pytest.fixture
def docker_runner(image, tmp_path, monkeypatch):
    """kfp.local on DockerRunner through podman's Docker API, every step a restricted pod;
    yields (pipeline root, a function that installs the handler for a run's arguments)."""
    from kfp import local
    from kfp.local import docker_task_handler

    work = tmp_path / "work"  # the pipeline root, mounted into every step's container
    work.mkdir()
    os.chown(work, 1000, 1000)
    with DockerAPIService(tmp_path) as service:
        monkeypatch.setenv("DOCKER_HOST", service.url)
        local.init(
            runner=local.DockerRunner(
                entrypoint=[""],
                user=USER,
                read_only=True,
                tmpfs={"/tmp": f"rw,size={TMP_SIZE},mode=1777"},
                shm_size=SHM_SIZE,
                cap_drop=["ALL"],
                network_mode="none",
            ),
            pipeline_root=str(work),
        )

        def for_run(arguments: dict) -> None:
            handler = task_handler(arguments)
            monkeypatch.setattr(docker_task_handler, "DockerTaskHandler", handler)

        yield work, for_run


def test_the_pipeline_runs_in_the_image_with_dockerrunner(image, docker_runner):
    from pipeline.pipeline import pirl_pretrain
    from pirl.data.demo import write_digits_folder

    work, for_run = docker_runner
    write_digits_folder(str(work / "digits"), size=32)
    for path in work.rglob("*"):
        os.chown(path, 1000, 1000)
    args = demo_arguments(str(work / "digits"), str(work / "out"))
    args.update(
        data_image=image,
        bench_image=image,
        train_overrides=QUICK_TRAIN,
        bench_overrides=QUICK_BENCH,
    )
    for_run(args)
    run = pirl_pretrain(**args)
    report = run.output
    out_dir = report.metadata["output_dir"]
    assert out_dir.startswith(str(work / "out" / "runs"))
    metrics = json.loads(
        (work / "out" / "runs" / out_dir.rsplit("/runs/", 1)[1] / "metrics.json").read_text()
    )
    assert {"trained", "random_init"} <= set(metrics["trunks"])
    assert "| evaluation |" in open(report.path).read()
    (root,) = [p for p in work.iterdir() if p.name.startswith("pirl-pretrain-")]
    train_out = json.loads((root / "train" / "executor_output.json").read_text())
    train_metrics = train_out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert train_metrics["global_steps"] > 0
    # every step's files were written by the pods' user
    assert {p.stat().st_uid for p in (work / "out").rglob("*")} == {1000}


def test_a_failing_step_fails_the_run(image, docker_runner):
    """The step's exit code reaches KFP: prep of a source that does not exist fails the task
    (kfp.local's own handler reported it SUCCESS, see the module doc)."""
    from pipeline.components import make_components

    work, for_run = docker_runner
    for_run({})
    prep = make_components(image).prep
    with pytest.raises(RuntimeError, match="prep"):
        prep(
            source=str(work / "no-such-folder"),
            dest=str(work / "dataset"),
            shard_size=0,
            resize=0,
            workers=1,
            val_fraction=0.0,
            reuse_existing=False,
        )
