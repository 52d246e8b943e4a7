"""`pip install pirl` gives the trainer: the pipeline, plot and demo packages are extras, imported
only by the features that need them, which name the extra when it is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pirl.extras import MissingExtra

from .conftest import subprocess_env

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
EXTRA_PACKAGES = ("kfp", "kubernetes", "kubeflow", "matplotlib", "sklearn")


def test_the_training_library_imports_no_extra():
    code = (
        "import sys\n"
        "import pirl.train, pirl.prep, pirl.extract, pirl.cli, pirl.benchmark.run\n"
        "import pirl.benchmark.cli, pirl.benchmark.report, pirl.data.demo, pirl.demo\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {EXTRA_PACKAGES!r})\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr


def test_extras_hold_what_the_library_no_longer_requires():
    deps = {d.split("[")[0] for d in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not deps & {"kfp", "kubernetes", "kubeflow-training", "matplotlib", "scikit-learn"}
    assert set(extras["pipeline"]) == {"kfp", "kfp-kubernetes", "kubeflow-training", "kubernetes"}
    assert extras["report"] == ["matplotlib"]
    everything = set(extras["pipeline"]) | set(extras["report"]) | set(extras["demo"])
    assert everything <= set(extras["dev"])


@pytest.mark.parametrize(
    "missing,extra,call",
    [
        ("matplotlib", "report", "plot"),
        ("sklearn", "demo", "digits"),
        ("kfp", "demo", "demo"),
    ],
)
def test_a_missing_extra_is_named(monkeypatch, tmp_path, capsys, missing, extra, call):
    for name in list(sys.modules):
        if name == missing or name.startswith(missing + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    if call == "demo":
        from pirl.demo import main

        assert main(["--work", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
        assert f"pip install 'pirl[{extra}]'" in capsys.readouterr().err
        return
    with pytest.raises(MissingExtra, match=rf"pip install 'pirl\[{extra}\]'"):
        if call == "plot":
            from pirl.benchmark.report import Pretraining, plot_png

            plot_png({}, Pretraining())
        else:
            from pirl.data.demo import write_digits_folder

            write_digits_folder(str(tmp_path))
