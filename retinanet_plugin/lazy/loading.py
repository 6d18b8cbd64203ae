"""Reading a Python (lazy) config: the one place that calls ``LazyConfig.load``.

Only a ``.py`` file goes to ``LazyConfig.load``: for a YAML file it would call
``yaml.unsafe_load``, which can construct arbitrary Python objects. YAML configs go through the
plugin's safe reader (:func:`retinanet_plugin.config.load_config`) everywhere.
"""

import os
from typing import Any, Sequence

from detectron2.config import LazyConfig

from .datasets import register_datasets

__all__ = ["LAZY_SUFFIX", "is_lazy_config", "load_lazy_config"]

LAZY_SUFFIX = ".py"


def is_lazy_config(config_file: str) -> bool:
    """Whether ``config_file`` is a Python (lazy) config, by its suffix; anything else is read
    as YAML."""
    return os.fspath(config_file).endswith(LAZY_SUFFIX)


def load_lazy_config(config_file: str, overrides: Sequence[str] = ()) -> Any:
    """The config of a ``.py`` file with ``key=value`` overrides applied, its datasets registered.

    Loading runs the file's code (a Python config is a program). The datasets of
    ``dataloader.coco_instances`` are registered again after the overrides, so an override of
    that key (or of the names the loaders use) takes effect.

    Args:
        config_file: a ``.py`` file.
        overrides: ``key=value`` strings, as detectron2's ``LazyConfig.apply_overrides`` takes.

    Raises:
        ValueError: ``config_file`` is not a ``.py`` file.
    """
    if not is_lazy_config(config_file):
        raise ValueError(
            f"{config_file}: not a Python config (.py); YAML configs are read by "
            "retinanet_plugin.config.load_config, never by LazyConfig.load"
        )
    cfg = LazyConfig.load(os.fspath(config_file))
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    if "dataloader" in cfg:
        register_datasets(cfg.dataloader)
    return cfg
