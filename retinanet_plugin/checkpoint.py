"""The project's checkpointer: crash-safe saves, loads that cannot run code, class-count check.

- Saves are atomic on local paths: the checkpoint is written to a temporary file in the same
  folder, flushed to disk (fsync), then renamed over its final name (``os.replace``), and only
  then is ``last_checkpoint`` rewritten the same way. A process killed at any moment leaves
  either the previous complete checkpoint or the new complete one, never a truncated file that
  ``--resume`` would take for a checkpoint.
- Loads cannot run code: ``.pth`` / ``.pyth`` files go through ``torch.load(weights_only=True)``
  and detectron2 / Detectron1 model-zoo ``.pkl`` files through :func:`load_pickle_safely`, whose
  unpickler rebuilds only numpy arrays and scalars, dicts, lists, tuples, strings and numbers.
- A checkpoint trained for another number of classes is refused where it is meant to fit.
- Resumes work across detectron2 versions: 0.6's trainer saves no optimizer (the project's
  trainer saves it beside the trainer's state, as ``optimizer`` / ``grad_scaler``), later
  versions save it inside (``trainer._trainer``); a checkpoint in one layout is read into the
  other where the running trainer expects it.
"""

import contextlib
import logging
import os
import pickle
import secrets
from typing import IO, Any, Callable, Dict, List, Optional

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .head import FocalRetinaNetHead

__all__ = ["RetinaNetCheckpointer", "UnsafeCheckpointError", "load_pickle_safely"]

logger = logging.getLogger(__name__)

# Temporary files of an unfinished save start with this; a killed save leaves one behind, which
# the next resume_or_load removes. The name never ends in ".pth", so detectron2 never lists it
# as a checkpoint.
TMP_PREFIX = ".tmp-"

# The globals a model-zoo pickle may name: what numpy needs to rebuild arrays and scalars (numpy 1
# and numpy 2 module names, pickle protocols 2 to 5), Python 2 / protocol-2 bytes, OrderedDict.
# Everything else (os.system, builtins.eval, subprocess.Popen, ...) is refused.
_PICKLE_ALLOWED_GLOBALS = frozenset(
    [(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
       ("collections", "OrderedDict")]
)  # fmt: skip


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names something other than plain data (it could run code on load)."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], filename: str):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 (Detectron1) pickles
        self._filename = filename

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"Refusing to load {self._filename}: it names {module}.{name}, which is not plain "
            f"data (a crafted pickle can run code on load). Model-zoo .pkl files hold only "
            f"numpy arrays, dicts, lists, tuples, strings and numbers."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"Refusing to load {self._filename}: it holds a persistent id, which plain "
            f"model-zoo .pkl files never do."
        )


def load_pickle_safely(filename: str) -> Any:
    """Unpickle a detectron2 / Detectron1 model-zoo ``.pkl`` file without running code.

    Args:
        filename (str): a local path or any path detectron2's ``PathManager`` opens.

    Returns:
        The unpickled object (dicts of numpy arrays in model-zoo files).

    Raises:
        UnsafeCheckpointError: the file names a class or function other than the numpy array /
            scalar constructors (the message names the file and the global).
    """
    with PathManager.open(filename, "rb") as f:
        return _DataOnlyUnpickler(f, filename).load()


# numpy dtypes whose arrays / scalars a .pth checkpoint may hold (numbers and booleans only).
_NUMPY_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)  # fmt: skip


def _numpy_safe_globals() -> List[Any]:
    """What torch's weights-only unpickler must additionally accept for numpy arrays and scalars
    (torch accepts only tensors and containers by default)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray
    allowed: List[Any] = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    allowed += [type(np.dtype(name)) for name in _NUMPY_DTYPES]
    # Files written under numpy 1 name the same functions numpy.core.multiarray.*.
    allowed += [(getattr(multiarray, f), f"numpy.core.multiarray.{f}") for f in ("_reconstruct",
                                                                               "scalar")]
    return allowed


def _torch_load_weights_only(filename: str) -> Any:
    try:
        # torch < 2.5 has no allowlist: numpy arrays in a .pth are then refused too.
        allow = getattr(torch.serialization, "safe_globals", None)
        with allow(_numpy_safe_globals()) if allow else contextlib.nullcontext():
            return torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"Refusing to load {filename}: torch.load(weights_only=True) found something other "
            f"than tensors and plain data in it (a crafted checkpoint can run code on load; load "
            f"it unsafely only if you trust its source). torch said: {e}"
        ) from e


# What detectron2 >= 2022 saves inside the trainer's state (``trainer._trainer``) and the project's
# trainer saves beside it under detectron2 0.6 (see engine/resume.py: missing_trainer_state).
_TRAINER_OWN_STATE = ("optimizer", "grad_scaler")


def _is_local(path: str) -> bool:
    return "://" not in path


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in its folder: fsync, then os.replace."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(
        folder, f"{TMP_PREFIX}{os.path.basename(path)}-{os.getpid()}-{secrets.token_hex(4)}"
    )
    # os.open rather than tempfile.mkstemp: the file gets the umask's permissions, not 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if os.name == "posix":  # makes the rename itself durable; directories can't be opened on NT
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _writer_alive(tmp_name: str) -> bool:
    """Whether another live process (e.g. a training run while this one only evaluates) may still
    be writing the temporary file ``tmp_name`` (``<prefix><name>-<pid>-<token>``)."""
    try:
        pid = int(tmp_name.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RetinaNetCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with atomic saves, code-free loads and a class-count check.

    Saving: see the module docstring. Paths with a scheme (``s3://``, ``manifold://``, ...) are
    saved by detectron2's non-atomic writer.

    Loading: ``.pth`` / ``.pyth`` through ``torch.load(weights_only=True)``, ``.pkl`` through
    :func:`load_pickle_safely` (then detectron2's own model-zoo / Caffe2 conversion). Files that
    would run code raise :class:`UnsafeCheckpointError` before anything is executed.

    Class count: detectron2's checkpointer drops every checkpoint tensor whose shape differs from
    the model's and only logs a warning, which is what fine-tuning to a new dataset wants, but for
    evaluation or resuming it silently leaves ``cls_score`` at its random initialisation when
    ``MODEL.RETINANET.NUM_CLASSES`` differs from the checkpoint's. This checkpointer raises
    instead. With ``fine_tune=True`` (the trainer's) the check applies only when
    :meth:`resume_or_load` resumes; loading ``MODEL.WEIGHTS`` for a new run keeps detectron2's
    behaviour, so a COCO model can be fine-tuned to another number of classes.

    The check runs after detectron2's key renaming (so it covers Detectron1 / pycls pickles too),
    on the keys of every :class:`FocalRetinaNetHead` in the model; the ValueError is raised before
    the model can be used, though its other weights may already be loaded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        fine_tune: bool = False,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as :class:`DetectionCheckpointer`.
            fine_tune (bool): whether loads of initial weights (``resume_or_load`` when not
                resuming) may leave a classifier of another class count at its initialisation.
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.fine_tune = fine_tune
        self._check_num_classes = True

    # ---- saving ----

    def save(self, name: str, **kwargs: Any) -> None:
        """Save the model and checkpointables to ``<save_dir>/<name>.pth``, atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            super().save(name, **kwargs)
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at a saved file, atomically (called after the file is in
        place)."""
        if not _is_local(self.save_dir):
            super().tag_last_checkpoint(last_filename_basename)
            return
        _atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )

    def remove_unfinished_saves(self) -> None:
        """Delete the temporary files that a save killed before its rename left in save_dir."""
        if not self.save_dir or not self.save_to_disk or not _is_local(self.save_dir):
            return
        if not os.path.isdir(self.save_dir):
            return
        for name in sorted(os.listdir(self.save_dir)):
            if not name.startswith(TMP_PREFIX) or _writer_alive(name):
                continue
            path = os.path.join(self.save_dir, name)
            logger.warning("Removing %s: a save that was interrupted before completion", path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    # ---- loading ----

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """As :class:`DetectionCheckpointer`, after removing unfinished saves; see ``fine_tune``
        for the class-count check."""
        self.remove_unfinished_saves()
        resuming = resume and self.has_checkpoint()
        self._check_num_classes = resuming or not self.fine_tune
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._check_num_classes = True

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """As :class:`DetectionCheckpointer`; after a load that raised (e.g. a refused file) the
        checkpointer can load again."""
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # Upstream detectron2 (2023+) records the path being loaded and asserts at the next
            # load that it was cleared, which it does only when a load returns.
            if getattr(self, "_parsed_url_during_load", None) is not None:
                self._parsed_url_during_load = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        loaded = self._read_file(filename)
        self._match_trainer_state_layout(loaded)
        return loaded

    def _torch_load(self, filename: str) -> Dict[str, Any]:
        # Upstream detectron2 reads .pth files through this method, then applies the path's
        # query (``?matching_heuristics=True``); 0.6 has neither.
        return _torch_load_weights_only(filename)

    def _read_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            # Unpickled once under the allowlist; detectron2 then reads the same bytes (now known
            # to name only numpy's constructors) and applies its model-zoo / Caffe2 conversion.
            load_pickle_safely(filename)
            return super()._load_file(filename)
        if filename.endswith(".pyth"):
            _torch_load_weights_only(filename)
            return super()._load_file(filename)  # pycls layout; the file is known to be data
        if hasattr(DetectionCheckpointer, "_torch_load"):
            return super()._load_file(filename)  # through self._torch_load
        loaded = _torch_load_weights_only(filename)
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _match_trainer_state_layout(self, checkpoint: Dict[str, Any]) -> None:
        """Move the optimizer (and AMP's grad scaler) of a checkpoint written under another
        detectron2 version to where the running trainer reads it (see the module docstring)."""
        trainer = self.checkpointables.get("trainer")
        saved = checkpoint.get("trainer")
        if trainer is None or not isinstance(saved, dict) or "iteration" not in saved:
            return
        expects_nested = "_trainer" in trainer.state_dict()
        if expects_nested and "_trainer" not in saved:
            if "optimizer" not in checkpoint:
                raise ValueError(
                    "Cannot resume: the checkpoint holds no optimizer state (written by detectron2 "
                    "0.6's own checkpointer?); this detectron2's trainer needs it. Start a new run "
                    "from its weights instead: MODEL.WEIGHTS <file>, without --resume."
                )
            nested = {"iteration": saved["iteration"]}
            nested.update({k: checkpoint.pop(k) for k in _TRAINER_OWN_STATE if k in checkpoint})
            saved["_trainer"] = nested
        elif not expects_nested and "_trainer" in saved:
            nested = saved.pop("_trainer")
            for key in _TRAINER_OWN_STATE:
                if key in nested and key in self.checkpointables:
                    checkpoint.setdefault(key, nested[key])

    def _load_model(self, checkpoint: Dict[str, Any]):
        incompatible = super()._load_model(checkpoint)
        if not self._check_num_classes:
            return incompatible
        wrong_shapes = {key: shape for key, shape, _ in incompatible.incorrect_shapes}
        for name, module in self.model.named_modules():
            if not isinstance(module, FocalRetinaNetHead):
                continue
            for param in ("weight", "bias"):
                key = f"{name}.cls_score.{param}" if name else f"cls_score.{param}"
                if key in wrong_shapes:
                    module.check_cls_score_shape(key, wrong_shapes[key])
        return incompatible
