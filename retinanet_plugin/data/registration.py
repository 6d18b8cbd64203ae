"""Datasets named in the config: registered from COCO JSON files and checked before training.

``DATASETS.COCO_INSTANCES`` lists ``[name, json_file, image_root]`` triples (see
``add_retinanet_plugin_config``); :func:`register_datasets_from_cfg` registers each with
detectron2's ``register_coco_instances``, so ``DATASETS.TRAIN`` / ``DATASETS.TEST`` can name them.

Relative paths in ``DATASETS.COCO_INSTANCES`` resolve against the folder of the YAML file that
sets the key: the ``--config-file`` itself, or the ``_BASE_`` file it inherits the key from (a
base file and its datasets can move together). When the key is given on the command line
(``DATASETS.COCO_INSTANCES "[[...]]"``), relative paths resolve against the working directory,
as any shell argument does. :func:`resolve_dataset_paths` rewrites them as absolute paths, so
the ``config.yaml`` that detectron2 saves in ``OUTPUT_DIR`` runs from anywhere.
"""

import logging
import os
from typing import List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..config_file import read_config_file
from .coco_check import CHECK_MODES, check_coco_json

__all__ = [
    "check_datasets",
    "register_config_datasets",
    "register_datasets_from_cfg",
    "resolve_dataset_paths",
]

logger = logging.getLogger(__name__)

KEY = "DATASETS.COCO_INSTANCES"


def _entries(cfg: CfgNode) -> List[Tuple[str, str, str]]:
    entries = []
    for entry in cfg.DATASETS.COCO_INSTANCES:
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(v, str) and v for v in entry)
        ):
            raise ValueError(
                f"{KEY}: each entry must be [name, json_file, image_root] (three non-empty "
                f"strings), got {entry!r}"
            )
        entries.append(tuple(entry))
    names = [e[0] for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{KEY}: dataset names {duplicates} appear more than once")
    return entries  # type: ignore[return-value]


def resolve_dataset_paths(
    cfg: CfgNode, config_file: Optional[str], opts: Sequence[str] = ()
) -> None:
    """Makes the paths of ``DATASETS.COCO_INSTANCES`` absolute, in place (cfg not frozen).

    Args:
        cfg: the merged config.
        config_file: the ``--config-file`` it was merged from; None: paths are relative to the
            working directory.
        opts: the command-line ``KEY VALUE`` list that was merged after the file.
    """
    if not cfg.DATASETS.COCO_INSTANCES:
        return
    from_command_line = KEY in list(opts)[::2]
    if config_file is None or from_command_line:
        folder = os.getcwd()
    else:
        # The file of the _BASE_ chain that sets the key, as the config reader tells it.
        setting = read_config_file(config_file).file_setting(KEY.split("."))
        folder = os.path.dirname(os.path.abspath(setting or config_file))

    def resolve(path: str) -> str:
        path = os.path.expanduser(os.path.expandvars(path))
        return os.path.normpath(os.path.join(folder, path))  # join keeps an absolute path

    cfg.DATASETS.COCO_INSTANCES = [
        [name, resolve(json_file), resolve(image_root)]
        for name, json_file, image_root in _entries(cfg)
    ]


def register_datasets_from_cfg(cfg: CfgNode) -> List[str]:
    """Registers every ``DATASETS.COCO_INSTANCES`` entry with ``register_coco_instances``.

    Safe to call again (``setup()`` twice in one process): an entry already registered with the
    same files is kept; one registered by an earlier call with other files is replaced (the
    config is what the user asks for now, and a warning says so). A name that detectron2 or
    user code registered otherwise (``coco_2017_train``, say) is an error, never overwritten.

    Returns:
        list[str]: the dataset names, in config order.
    """
    names = []
    for name, json_file, image_root in _entries(cfg):
        names.append(name)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("registered_by") != KEY:
                raise ValueError(
                    f"{KEY}: dataset {name!r} is already registered (not by {KEY}, e.g. one of "
                    "detectron2's builtin datasets); choose another name"
                )
            if (meta.json_file, meta.image_root) == (json_file, image_root):
                continue
            logger.warning(
                "%s: re-registering %r with %s, %s (was %s, %s)",
                KEY,
                name,
                json_file,
                image_root,
                meta.json_file,
                meta.image_root,
            )
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {"registered_by": KEY}, json_file, image_root)
    return names


def _num_classes(cfg: CfgNode) -> Tuple[Optional[str], Optional[int]]:
    arch = cfg.MODEL.META_ARCHITECTURE
    if "RetinaNet" in arch:
        return "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    if arch == "GeneralizedRCNN" and cfg.MODEL.ROI_HEADS.NAME:
        return "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES
    return None, None


def check_datasets(cfg: CfgNode, *, train: bool = True) -> None:
    """Checks every COCO dataset the run uses with :func:`check_coco_json` (mode
    ``DATASETS.CHECK``), and that its category count equals the model's class count.

    Args:
        cfg: the run's config.
        train: also check ``DATASETS.TRAIN`` (they must hold annotations); False for
            ``--eval-only``, which reads only ``DATASETS.TEST``.

    Raises:
        CocoCheckError: a dataset fails; the message names the JSON, image and annotation.
        ValueError: ``DATASETS.CHECK`` is not one of ``off``, ``header``, ``decode``, or a
            dataset name is not registered.
    """
    mode = cfg.DATASETS.CHECK
    if mode not in CHECK_MODES:
        raise ValueError(f"DATASETS.CHECK must be one of {CHECK_MODES}, got {mode!r}")
    if mode == "off":
        return
    key, num_classes = _num_classes(cfg)
    train_names = list(cfg.DATASETS.TRAIN) if train else []
    for name in dict.fromkeys(train_names + list(cfg.DATASETS.TEST)):
        if name not in DatasetCatalog.list():
            raise ValueError(
                f"dataset {name!r} (DATASETS.TRAIN / DATASETS.TEST) is not registered; add it to "
                f"{KEY} as [name, json_file, image_root]"
            )
        meta = MetadataCatalog.get(name)
        if meta.get("evaluator_type") != "coco" or meta.get("json_file") is None:
            logger.warning("Dataset %r is not a COCO instances JSON: not checked", name)
            continue
        check_coco_json(
            meta.json_file,
            meta.get("image_root"),
            mode=mode,
            num_classes=num_classes,
            num_classes_key=key or "num_classes",
            require_annotations=name in train_names,
        )


def register_config_datasets(cfg: CfgNode) -> None:
    """Registers what the config can name: every ``DATASETS.COCO_INSTANCES`` entry, and the
    DeepForest demo sets when ``DATASETS.TRAIN`` / ``TEST`` name them. ``train_net.py`` and the
    tools call this one function, so a dataset a training run can use, a tool can use too."""
    from .deepforest import DATASET_NAMES, register_deepforest  # the demo's fetching code

    register_datasets_from_cfg(cfg)
    if set(DATASET_NAMES.values()) & set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST):
        register_deepforest()
