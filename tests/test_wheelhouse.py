"""The wheelhouse (scripts/build_wheelhouse.sh) carries everything that scripts/gpu_check.sh needs
on a GPU machine with no package registry, and gpu_check.sh refuses a folder that is not one.

Nothing is downloaded or built here: the invariants are read from the scripts and the source."""

import ast
import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "scripts" / "build_wheelhouse.sh"
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"

# What the GPU machine's Python runs: every test module (pytest imports all of them to collect,
# even with -k) and the examples they import, the package, train_net.py and the two benchmarks
# of gpu_check.sh.
SOURCES = [
    *sorted((REPO / "tests").glob("*.py")),
    *sorted((REPO / "examples").glob("*.py")),
    *sorted((REPO / "retinanet_plugin").rglob("*.py")),
    REPO / "train_net.py",
    REPO / "benchmarks" / "focal_loss.py",
    REPO / "benchmarks" / "retinanet.py",
]
# Imported from the repository itself (a test puts a folder of it on sys.path), not from a
# distribution.
LOCAL = {"retinanet_plugin"} | {p.stem for p in [*REPO.glob("*.py"), *REPO.glob("*/*.py")]}
# Distributions the wheelhouse gets by another route than WHEELS: Pillow is built for cp312 and
# detectron2 comes as its sdist (both named in build_wheelhouse.sh's comments).
BUILT = {"pillow", "pb1-detectron2"}
# The GPU image holds opencv-python-headless, whose cv2 is opencv-python's (installed here).
SAME_MODULE = {"opencv-python": "opencv-python-headless"}
# gpu_check.sh installs for the GPU image's Python.
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _bash_array(name: str) -> set:
    match = re.search(rf"^{name}=\(\n(.*?)\n\)", BUILD.read_text(), re.M | re.S)
    assert match, f"{BUILD} has no {name}=( ... ) array"
    return {_normalise(word) for word in match.group(1).split()}


WHEELS = _bash_array("WHEELS")
IMAGE = _bash_array("IMAGE_PROVIDES")
CARRIED_OR_THERE = WHEELS | IMAGE | BUILT


def _imported_top_level(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_wheelhouse_and_image_cover_every_import_of_the_gpu_check():
    module_dists = metadata.packages_distributions()
    uncovered = {}
    for path in SOURCES:
        for module in _imported_top_level(path) - LOCAL - set(sys.stdlib_module_names):
            dists = {_normalise(d) for d in module_dists.get(module, [])}
            dists = {SAME_MODULE.get(d, d) for d in dists}
            # A module no installed distribution provides cannot be checked: that is a failure too.
            if not dists & CARRIED_OR_THERE:
                uncovered.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert not uncovered, (
        f"imported but neither in WHEELS nor IMAGE_PROVIDES of {BUILD.name}: {uncovered}"
    )


@pytest.mark.parametrize("dist", sorted(WHEELS | BUILT | {"retinanet-plugin"}))
def test_what_the_wheelhouse_installs_finds_its_requirements(dist):
    """pip runs with --no-index there: each requirement (for Python 3.12, no extras) of a carried
    distribution, detectron2's and the plugin's included, is carried too or in the image. The
    versions are read from this venv, as build_wheelhouse.sh reads them."""
    missing = []
    for line in metadata.requires(dist) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(MARKER_ENV):
            continue
        name = _normalise(requirement.name)
        if SAME_MODULE.get(name, name) not in CARRIED_OR_THERE:
            missing.append(line)
    assert not missing, f"{dist} requires {missing}, which the GPU machine would not have"


def test_pillow_built_for_cp312_satisfies_requirements_txt():
    """detectron2 0.6 needs Image.LINEAR (Pillow < 10); requirements.txt says which Pillow."""
    built = re.search(r"^PILLOW_VERSION=(\S+)$", BUILD.read_text(), re.M).group(1)
    spec = next(Requirement(line.split("#")[0]) for line in
                (REPO / "requirements.txt").read_text().splitlines()
                if line.lower().startswith("pillow"))
    assert spec.specifier.contains(built), (built, str(spec))


def _gpu_check(*args, tmp_path):
    return subprocess.run(
        ["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "GPU_CHECK_OUT": str(tmp_path / "out"),
             "PY": sys.executable},
    )  # fmt: skip


def test_gpu_check_refuses_a_folder_that_is_not_a_wheelhouse(tmp_path):
    (tmp_path / "wh").mkdir()
    result = _gpu_check("--from-wheelhouse", str(tmp_path / "wh"), "--install-only",
                        tmp_path=tmp_path)
    assert result.returncode == 1
    log = (tmp_path / "out" / "install.log").read_text()
    assert "has no requirements.txt: not a folder made by build_wheelhouse.sh" in log


def test_gpu_check_refuses_a_wheelhouse_whose_files_changed(tmp_path):
    wh = tmp_path / "wh"
    wh.mkdir()
    for name in ("requirements.txt", "image_provides.txt"):
        (wh / name).write_text("")
    (wh / "SHA256SUMS").write_text(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  requirements.txt\n"
    )  # the sha256 of an empty file: requirements.txt is still empty, so this line passes
    (wh / "requirements.txt").write_text("truncated")  # ... until the file changes
    result = _gpu_check("--from-wheelhouse", str(wh), "--install-only", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "files differ from its SHA256SUMS" in (tmp_path / "out" / "install.log").read_text()


def test_gpu_check_names_a_bad_argument(tmp_path):
    result = _gpu_check("--from-wheelhous", "x", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "unknown argument '--from-wheelhous'" in result.stderr
    result = _gpu_check("--install-only", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "--install-only goes with --from-wheelhouse DIR" in result.stderr


def test_make_wheelhouse_runs_the_script_with_the_venvs_python():
    recipe = subprocess.run(
        ["make", "-n", "-s", "wheelhouse", "PY=/some/venv/bin/python"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "PY=/some/venv/bin/python bash scripts/build_wheelhouse.sh wheelhouse" in recipe


def test_the_wheelhouse_is_ignored_by_git():
    """The device tool carries ignored paths named in `carry`; never committed by accident."""
    result = subprocess.run(["git", "check-ignore", "-q", "wheelhouse/wheels/x.whl"], cwd=REPO)
    assert result.returncode == 0
