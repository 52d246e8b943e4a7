"""The image tier: the tests here run the built image under podman (those modules are marked
`image` and `slow`; test_container_job_spec.py checks the container commands without podman).

Skipped, with the reason, where podman or the image is missing; `.ci/run` builds the image and
sets PIRL_REQUIRE_IMAGE=1, which turns those skips into failures. PIRL_TEST_IMAGE names another
image (default: what `make image` tags for this commit, localhost/pirl:VERSION-<sha12>).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .podman import default_image


def unavailable(reason: str):
    if os.environ.get("PIRL_REQUIRE_IMAGE") == "1":
        pytest.fail(f"{reason} (PIRL_REQUIRE_IMAGE=1: the image tier must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def image() -> str:
    """The image under test, present in podman's store."""
    if os.geteuid() != 0:
        unavailable(
            "the image tier runs rootful podman and hands files to uid 1000: run it as root"
        )
    if shutil.which("podman") is None:
        unavailable("podman is not installed: `make image` installs it and builds the image")
    name = os.environ.get("PIRL_TEST_IMAGE") or default_image()
    exists = subprocess.run(["podman", "image", "exists", name], capture_output=True, timeout=60)
    if exists.returncode != 0:
        unavailable(f"image {name} is not built: run `make image` (images/build.sh --local)")
    return name
