"""The one reader of YAML config files: safe loading, the ``_BASE_`` chain, where a key was set.

detectron2's ``CfgNode.merge_from_file`` reads YAML with fvcore, which falls back to
``yaml.unsafe_load`` when a file holds a Python tag: ``!!python/object/apply:os.system [...]`` runs
a command while loading. Here every file is read with yaml's safe loader plus one tag, the
arithmetic eval that detectron2's model-zoo Base-RetinaNet.yaml writes its anchor sizes with
(``!!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3)] for x in [32, 64, 128, 256,
512]]"]``), computed by a small interpreter within fixed bounds, never by Python's eval.

:func:`read_config_file` reads a file and its ``_BASE_`` files (:class:`ConfigFile`: each file's
own keys, and which file set a key); :func:`load_config_file` merges them into a config through
detectron2's own ``merge_from_file``. Every entry point (``train_net.py``, the tools, dataset
registration) reads configs through these two functions.
"""

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager

from .config_eval import BOUNDS, Arithmetic, BadArithmetic, Budget, UnsafeTag

__all__ = ["ConfigFile", "load_config_file", "read_config_file"]

_EVAL_TAG = "tag:yaml.org,2002:python/object/apply:eval"
_BASE_KEY = "_BASE_"

# A config and its _BASE_ files: each resolved path is read once per load, and the _BASE_ tree
# holds at most this many entries (a file named again counted again: merging visits it again).
_MAX_BASE_ENTRIES = 64
# Values (mapping keys and values, list items) in all of a config's files, a YAML alias counted
# each time it is used: ``b: &b [*a, *a]`` repeated builds 2 ** n values from a few lines.
_MAX_VALUES = 1_000_000


class _Loader(yaml.SafeLoader):
    """yaml's safe loader plus the arithmetic eval tag, computed by :class:`Arithmetic`."""

    def __init__(self, stream: Any, budget: Optional[Budget] = None):
        super().__init__(stream)
        # Of all the eval tags of the config's files: the bounds hold for them together.
        self.budget = Budget() if budget is None else budget


def _construct_eval(loader: _Loader, node: yaml.Node) -> Any:
    args = loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None
    if not args or len(args) != 1 or not isinstance(args[0], str):
        raise UnsafeTag(f"{node.tag} with arguments other than one expression string")
    return Arithmetic(args[0], loader.budget).evaluate()


def _load_yaml(stream: Any, budget: Budget) -> Any:
    """``yaml.load(stream, Loader=_Loader)``, the eval tags within ``budget``."""
    loader = _Loader(stream, budget)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _count_values(data: Any, budget: Budget) -> None:
    """Counts the values in ``data`` (a value reached twice through YAML aliases counted twice)
    into ``budget``; stops, raising ValueError, once they exceed _MAX_VALUES."""
    stack = [data]
    while stack:
        value = stack.pop()
        budget.values += 1
        if budget.values > _MAX_VALUES:
            raise ValueError(
                f"holds more than {_MAX_VALUES} values (mapping keys and values, list items, a "
                "YAML alias counted each time it is used, in all of the config's files)"
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


_Loader.add_constructor(_EVAL_TAG, _construct_eval)


@dataclass
class ConfigFile:
    """A YAML config file as :func:`read_config_file` read it, with its ``_BASE_`` files.

    Attributes:
        path (str): the file: as given, or for a ``_BASE_``, as resolved against the folder of
            the file that names it.
        data (dict): its own keys, eval tags computed, ``_BASE_`` removed.
        bases (list[ConfigFile]): its ``_BASE_`` files, in the order they are merged.
    """

    path: str
    data: Dict[str, Any]
    bases: List["ConfigFile"] = field(default_factory=list)

    def merged(self) -> Dict[str, Any]:
        """The config the file describes, as fvcore merges a ``_BASE_`` chain: the bases in
        order, then this file's keys on top; mappings merge key by key, other values replace."""
        merged: Dict[str, Any] = {}
        for base in self.bases:
            _merge_into(base.merged(), merged, base.path)
        _merge_into(copy.deepcopy(self.data), merged, self.path)
        return merged

    def file_setting(self, keys: Sequence[str]) -> Optional[str]:
        """The file whose value of the key ``keys`` (e.g. ``("DATASETS", "COCO_INSTANCES")``)
        :meth:`merged` holds: this one, or the nearest base that sets it (of several bases, the
        last one); None when no file of the chain sets it."""
        data = self.data
        for key in keys:
            if not isinstance(data, dict) or key not in data:
                break
            data = data[key]
        else:
            return self.path
        for base in reversed(self.bases):
            found = base.file_setting(keys)
            if found is not None:
                return found
        return None


def _merge_into(source: Dict[str, Any], target: Dict[str, Any], path: str) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and key in target:
            if not isinstance(target[key], dict):
                raise ValueError(f"{path}: {key} is a mapping, but not in the _BASE_ it inherits")
            _merge_into(value, target[key], path)
        else:
            target[key] = value


def read_config_file(path: str) -> ConfigFile:
    """Reads the YAML config ``path`` and its ``_BASE_`` files: the one reader of config files
    (merging them into a config: :func:`load_config_file`).

    Each file is read with yaml's safe loader; the one Python tag accepted is detectron2's
    ``!!python/object/apply:eval`` of arithmetic on numbers in lists, computed within fixed
    bounds. ``_BASE_`` (a file or a list of files) resolves as in detectron2: ``~`` expanded, and
    a path that starts with neither ``/`` nor ``http(s)://`` taken relative to the folder of the
    file that names it. Files are opened with detectron2's ``PathManager`` (URLs are fetched).

    Raises:
        ValueError: naming ``path`` and the file at fault, when a file holds another Python tag
            (which could run code while loading), an eval expression that is not arithmetic or
            exceeds the bounds (for all the eval tags of the chain together), no mapping of keys,
            or more than 1,000,000 values counting each use of a YAML alias, a list or mapping
            as a mapping key, other YAML that builds no config, or nesting beyond Python's
            recursion limit; when the chain includes itself (``./a.yaml`` and ``a.yaml`` are
            one file); or when its ``_BASE_`` entries number more than 64 (each file is read
            once per call however its path is spelt, a file named again counted again).
        FileNotFoundError: a ``_BASE_`` file is missing; the message names the entry, the file
            that names it, the folder it was looked for in, and the fix.
    """
    return _read(path, top=path, chain=(), budget=Budget(), read={})


def _read(
    path: str,
    top: str,
    chain: Tuple[str, ...],
    budget: Budget,
    read: Dict[str, Tuple[ConfigFile, int]],
) -> ConfigFile:
    """Reads ``path`` and its bases into ``read`` (resolved path -> the file, and the number of
    _BASE_ entries beneath it), each resolved path once."""
    if _same_file(path) in map(_same_file, chain):
        raise ValueError(f"Config file {top}: {path} includes itself through _BASE_")
    within = f"Config file {top} (or one of its _BASE_ files)"
    try:
        with PathManager.open(path, "r") as f:
            data = _load_yaml(f, budget)
    except yaml.constructor.ConstructorError as e:
        if e.problem == "found unhashable key":
            raise ValueError(
                f"{within}: {path} holds a list or mapping as a mapping key, which no config "
                f"key can be; refused. Config keys are names. {e}"
            ) from e
        if not (e.problem or "").startswith("could not determine a constructor for the tag"):
            raise ValueError(
                f"{within}: {path} holds YAML that builds no config ({e.problem}); refused. {e}"
            ) from e
        raise ValueError(_unsafe_tag(within, path, e)) from e
    except UnsafeTag as e:
        raise ValueError(_unsafe_tag(within, path, e)) from e
    except RecursionError as e:
        raise ValueError(
            f"{within}: {path} nests lists or mappings too deeply for the YAML reader (beyond "
            "Python's recursion limit); refused. A config nests a few levels."
        ) from e
    except BadArithmetic as e:
        raise ValueError(
            f"{within}: in {path}, {e}; refused. The eval tag's arithmetic is bounded: {BOUNDS}."
        ) from e
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{within}: {path} holds a {type(data).__name__}, not config keys")
    try:
        _count_values(data, budget)
    except ValueError as e:
        raise ValueError(f"{within}: {path} {e}; refused.") from e
    entries = data.pop(_BASE_KEY, [])
    entries = [entries] if isinstance(entries, str) else entries
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ValueError(
            f"{within}: in {path}, _BASE_ must be a file or a list of files, got {entries!r}"
        )
    chain = chain + (path,)
    bases = []
    entries_before = budget.base_entries
    for entry in entries:
        base = _base_file(path, entry)
        # The file already read by another spelling of its path (./a.yaml, d/../a.yaml).
        base = next((known for known in read if _same_file(known) == _same_file(base)), base)
        # A file named again is not read again, but merging visits it (and its bases) again.
        budget.base_entries += 1 + (read[base][1] if base in read else 0)
        if budget.base_entries > _MAX_BASE_ENTRIES:
            raise ValueError(
                f"{within}: in {path}, the _BASE_ entry {entry!r} takes the chain beyond "
                f"{_MAX_BASE_ENTRIES} _BASE_ entries (a file named again counted again, with its "
                "own _BASE_ entries); refused."
            )
        bases.append(read[base][0] if base in read else _read(base, top, chain, budget, read))
    read[path] = (ConfigFile(path, data, bases), budget.base_entries - entries_before)
    return read[path][0]


def _unsafe_tag(within: str, path: str, e: Exception) -> str:
    return (
        f"{within} holds a YAML tag that builds Python objects, which could run code while "
        "loading; refused. Configs hold only plain values (numbers, strings, lists, "
        "mappings), or arithmetic on numbers through !!python/object/apply:eval as "
        f"detectron2's model zoo writes anchor sizes. In {path}: {e}"
    )


def _same_file(path: str) -> str:
    """``path`` as the file it names: a URL as written, a local path resolved (``.``, ``..``,
    symbolic links), so that one file spelt two ways is one file."""
    return path if "://" in path else os.path.realpath(path)


# The configs/ folder of this checkout (absent from a wheel): a config copied out of it finds its
# base there.
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _base_file(path: str, entry: str) -> str:
    base = os.path.expanduser(entry) if entry.startswith("~") else entry
    if base.startswith(("http://", "https://")):
        return base
    if not base.startswith("/"):
        base = os.path.join(os.path.dirname(path), base)
    # ./a.yaml of a/b.yaml is a/a.yaml (unless a symbolic link makes .. mean another folder).
    if _same_file(os.path.normpath(base)) == _same_file(base):
        base = os.path.normpath(base)
    if PathManager.isfile(base):
        return base
    if entry.startswith(("/", "~")):
        where = f"its _BASE_ {entry!r} ({base}) does not exist"
    else:
        where = (
            f"its _BASE_ {entry!r} was looked for in {os.path.dirname(path) or '.'} (a "
            f"relative _BASE_ is relative to the folder of the file that names it), and "
            f"{base} does not exist"
        )
    fix = "copy the base beside it, or write the base's absolute path"
    for candidate in (entry, os.path.basename(entry)):
        candidate = os.path.join(_CONFIGS, candidate)
        if os.path.isfile(candidate):
            fix += f'; this checkout\'s configs/ holds one: _BASE_: "{os.path.normpath(candidate)}"'
            break
    raise FileNotFoundError(
        f"Config file {path}: {where}. A config copied to another folder "
        f"loses its relative _BASE_: {fix}."
    )


def _read_merged(filename: str, allow_unsafe: bool = False) -> Dict[str, Any]:
    return read_config_file(filename).merged()


def load_config_file(cfg: CN, path: str) -> CN:
    """Merge the YAML config ``path`` (and its ``_BASE_`` files) into ``cfg``, read safely.

    detectron2's ``CfgNode.merge_from_file`` would load a file that holds a Python tag with
    ``yaml.unsafe_load``; here the files are read by :func:`read_config_file` (a Python tag
    refused, except ``!!python/object/apply:eval`` of bounded arithmetic on numbers in lists, as
    detectron2's model-zoo ``Base-RetinaNet.yaml`` writes its anchor sizes) and merged by
    detectron2's ``merge_from_file``.

    Args:
        cfg (CfgNode): detectron2's config to merge into, in place (and returned).
        path (str): the YAML file.

    Raises:
        ValueError, FileNotFoundError: as :func:`read_config_file`, naming the file.
    """
    # detectron2's merge_from_file gets the files' content from self.load_yaml_with_base (fvcore's
    # reader); for this merge, an attribute of cfg's own (yacs keeps its flags there too) hands
    # it what read_config_file read. The rest is detectron2's: every key checked against the
    # defaults, old config versions upgraded.
    cfg.__dict__["load_yaml_with_base"] = _read_merged
    try:
        cfg.merge_from_file(path)
    finally:
        del cfg.__dict__["load_yaml_with_base"]
    return cfg
