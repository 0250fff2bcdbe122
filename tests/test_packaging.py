"""The wheel a site installs (the package is not on PyPI): built from the checkout with
``pip wheel --no-deps --no-build-isolation -w dist .``, it holds every sub-package, the stage configs of ``bundles/``
(as ``monai_histodiff/bundles/``, where :func:`monai_histodiff.bundle.config_dir` looks when installed) and the
metadata schema; installed with ``pip install --target`` and run from an empty folder, with the repository not
importable, it writes toy tiles and trains the auxiliary classifier for one epoch from the installed configs.

Nothing is downloaded: the wheel is built with the running interpreter's setuptools (``--no-build-isolation``,
``--no-index``), and torch, MONAI and the other dependencies come from the running interpreter's site-packages.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("setup.py", "README.md", "LICENSE", "MANIFEST.in")  # copied when present
SOURCE_DIRS = ("monai_histodiff", "bundles")


def _why_no_wheel() -> str | None:
    """Why a wheel cannot be built offline here (None when it can): setuptools with its ``bdist_wheel`` command
    (setuptools >= 70.1), or setuptools and the ``wheel`` package."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed: cannot build the wheel offline (pip install setuptools wheel)"
    try:
        has_bdist_wheel = importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    except ImportError:
        has_bdist_wheel = False
    if not has_bdist_wheel and importlib.util.find_spec("wheel") is None:
        return "neither setuptools >= 70.1 (bdist_wheel) nor the wheel package is installed: cannot build the wheel"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_no_wheel() is not None, reason=str(_why_no_wheel()))]


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _build_wheel(tmp: Path) -> Path:
    """The wheel a site builds from a checkout, built from a copy of the source (no build/ or egg-info in it)."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    for name in SOURCE_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(src)], cwd=tmp)
    wheels = sorted(dist.glob("monai_histodiff-*.whl"))
    assert len(wheels) == 1, f"expected one monai_histodiff wheel in {dist}, found {[w.name for w in wheels]}"
    return wheels[0]


def _expected_members() -> set[str]:
    """What the wheel must hold: every module of the package, every file of ``bundles/`` (installed as
    ``monai_histodiff/bundles/``) and the metadata schema."""
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "monai_histodiff").rglob("*.py")
               if "__pycache__" not in p.parts}
    configs = {f"monai_histodiff/bundles/{p.name}" for p in (REPO / "bundles").iterdir()
               if p.suffix in (".json", ".conf")}
    return modules | configs | {"monai_histodiff/bundle/resources/meta_schema.json"}


def _dependency_paths() -> list[str]:
    """The running interpreter's site-packages folders (torch, MONAI, ...), without the repository checkout."""
    folders = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
               sysconfig.get_paths()["platlib"]]
    out = []
    for folder in folders:
        # the checkout itself must not be on the path; a virtualenv inside it (.venv, as make creates) is fine
        if folder and Path(folder).is_dir() and folder not in out and Path(folder).resolve() != REPO.resolve():
            out.append(folder)
    return out


def test_wheel_installs_and_runs_a_stage_from_an_empty_folder(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next((z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    missing = sorted(_expected_members() - names)
    assert not missing, f"{wheel.name} lacks {missing}"
    for sub in ("apps", "bundle", "data", "engines", "handlers", "inferers", "metrics", "networks", "schedulers",
                "selection"):
        assert f"monai_histodiff/{sub}/__init__.py" in names, sub
    assert "monai-histodiff = monai_histodiff.__main__:main" in entry_points, entry_points
    stray = sorted(n for n in names if n.startswith(("tests/", "bundles/", "docs/", "benchmarks/", "examples/")))
    assert not stray, f"{wheel.name} holds files outside the package: {stray}"

    site_dir = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site_dir),
          str(wheel)], cwd=tmp_path)

    work = tmp_path / "work"  # the site's working folder: empty, no repository, no bundles/
    work.mkdir()
    # -S: no site-packages processing, so the editable install's finder (a .pth of the development venv) cannot
    # bring the checkout back; the installed wheel first, the dependencies after it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HISTODIFF"))}
    env.update(PYTHONPATH=os.pathsep.join([str(site_dir), *_dependency_paths()]), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    python = [sys.executable, "-S"]

    where = _run([*python, "-c", "import json, monai_histodiff as m; from monai_histodiff.bundle import config_dir, "
                  "config_files; print(json.dumps([m.__file__, str(config_dir()), "
                  "config_files('train_aux_classifier', small=True)]))"], work, env).stdout
    package_file, configs_dir, configs = json.loads(where.strip().splitlines()[-1])
    for path in (package_file, configs_dir, *configs):  # the installed copy, never the checkout
        assert Path(path).resolve().is_relative_to(site_dir.resolve()), f"{path} is not under {site_dir}"
    assert [Path(c).name for c in configs] == ["common.json", "train_aux_classifier.json", "small.json"], configs

    _run([*python, "-m", "monai_histodiff", "toy-data", "--output", "data", "--num_per_class", "8"], work, env)
    classes = sorted(p.name for p in (work / "data").iterdir() if p.is_dir())
    assert len(classes) >= 2, classes

    config_arg = repr(configs)  # MONAI's list form, read by fire as a Python literal
    assert ast.literal_eval(config_arg) == configs
    _run([*python, "-m", "monai.bundle", "run", "--config_file", config_arg, "--dataset_dir", "data",
          "--output_dir", "runs", "--max_epochs", "1", "--num_workers", "0", "--label_per_class", "4"],
         work, env, timeout=540)
    assert (work / "runs" / "train_aux_classifier" / "aux_classifier.pt").is_file(), \
        sorted(str(p.relative_to(work)) for p in (work / "runs").rglob("*"))
    assert (work / "runs" / "split.json").is_file()
