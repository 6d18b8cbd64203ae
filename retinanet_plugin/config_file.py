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

import ast
import copy
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager

__all__ = ["ConfigFile", "load_config_file", "read_config_file"]

_EVAL_TAG = "tag:yaml.org,2002:python/object/apply:eval"
_BASE_KEY = "_BASE_"

# The eval tag's bounds: far beyond any config value, and small enough that the costliest
# expression within them is computed in well under a second.
_MAX_EXPRESSION_CHARS = 10_000
_MAX_INT_BITS = 128
_MAX_LIST_LENGTH = 10_000
# Nodes evaluated, in all the eval tags of a config's files (the file and its _BASE_ chain); a loop
# iteration is one.
_MAX_STEPS = 100_000
# Numbers and lists in the values that all the eval tags of a config's files make, a list counted
# again with all its elements each time it is placed once more (``[[v, v] for v in [...]]`` nested
# 60 deep makes 2 ** 60 elements from a few steps).
_MAX_ELEMENTS = 100_000
_BOUNDS = (
    f"integers of at most {_MAX_INT_BITS} bits, finite floats, lists of at most "
    f"{_MAX_LIST_LENGTH} items, {_MAX_ELEMENTS} elements (numbers and lists, a reused list counted "
    f"each time it is placed) and {_MAX_STEPS} steps in all of a config's files"
)
# A config and its _BASE_ files: each resolved path is read once per load, and the _BASE_ tree
# holds at most this many entries (a file named again counted again: merging visits it again).
_MAX_BASE_ENTRIES = 64
# Values (mapping keys and values, list items) in all of a config's files, a YAML alias counted
# each time it is used: ``b: &b [*a, *a]`` repeated builds 2 ** n values from a few lines.
_MAX_VALUES = 1_000_000

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.List, ast.Tuple,
          ast.ListComp, ast.comprehension, ast.BinOp, ast.UnaryOp, *_BINARY, *_UNARY)  # fmt: skip


class _UnsafeTag(Exception):
    """A YAML tag, or an eval expression, that would build Python objects other than numbers in
    lists (and so could run code)."""


class _BadArithmetic(Exception):
    """Arithmetic in an eval tag that fails in Python or exceeds the bounds above."""


class _Budget:
    """What one config's files (the file and its ``_BASE_`` chain) have used of the bounds."""

    def __init__(self) -> None:
        self.steps = 0  # of _MAX_STEPS
        self.elements = 0  # of _MAX_ELEMENTS
        self.values = 0  # of _MAX_VALUES
        self.base_entries = 0  # of _MAX_BASE_ENTRIES


class _Arithmetic:
    """Computes an eval-tag expression as Python's eval would, over int and float constants,
    lists, tuples and list comprehensions, with ``+ - * / **`` and unary ``+ -``.

    Cost is bounded by what is computed, not by the expression's shape: each evaluated node is a
    step, a power is refused before it is computed when its result would exceed the integer
    bound, every value is checked as it is made (an int's bits, a float's finiteness, a list's
    length), and the elements of the values made are counted: a list placed into another list
    for the first time adds itself, one already placed (a loop variable, a reused value) adds all
    its elements again, so the count bounds the full size of every value, shared parts included.
    """

    def __init__(self, expression: str, budget: Optional[_Budget] = None):
        """
        Args:
            expression: the eval tag's argument.
            budget: the steps and elements already taken by the earlier eval tags of the config's
                files (they share one budget), updated as this expression is computed.
        """
        self.expression = expression
        self.budget = _Budget() if budget is None else budget
        # id of each list or tuple made -> [the value (kept alive), its elements, placed yet].
        self._lists: Dict[int, List[Any]] = {}

    def _says(self, what: str) -> str:
        shown = self.expression if len(self.expression) <= 200 else self.expression[:200] + "..."
        return f"eval of {shown!r} {what}"

    def evaluate(self) -> Any:
        if len(self.expression) > _MAX_EXPRESSION_CHARS:
            raise _BadArithmetic(
                f"an eval expression of {len(self.expression)} characters "
                f"(at most {_MAX_EXPRESSION_CHARS})"
            )
        try:
            tree = ast.parse(self.expression, mode="eval")
        except (SyntaxError, ValueError) as e:
            raise _UnsafeTag(self._says(f"does not parse: {e}")) from e
        except (RecursionError, MemoryError) as e:
            raise _BadArithmetic(self._says("nests too deeply")) from e
        self._check_nodes(tree)
        try:
            return self._eval(tree.body, {})
        except RecursionError as e:
            raise _BadArithmetic(self._says("nests too deeply")) from e

    def _check_nodes(self, tree: ast.AST) -> None:
        """Only what :meth:`_eval` computes, also where a loop over an empty list would never
        reach it."""
        loop_vars = {
            n.target.id
            for n in ast.walk(tree)
            if isinstance(n, ast.comprehension) and isinstance(n.target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, _NODES):
                raise _UnsafeTag(
                    self._says(
                        f"uses {type(node).__name__}, not only arithmetic on numbers in lists"
                    )
                )
            if isinstance(node, ast.Constant) and type(node.value) not in (int, float):
                raise _UnsafeTag(self._says(f"holds the constant {node.value!r}"))
            if isinstance(node, ast.Name) and node.id not in loop_vars:
                raise _UnsafeTag(self._says(f"names {node.id!r}"))
            if isinstance(node, ast.comprehension) and (
                node.ifs or node.is_async or not isinstance(node.target, ast.Name)
            ):
                raise _UnsafeTag(self._says("filters its comprehension or unpacks its variable"))

    def _eval(self, node: ast.AST, names: Dict[str, Any]) -> Any:
        self.budget.steps += 1
        if self.budget.steps > _MAX_STEPS:
            raise _BadArithmetic(
                self._says(
                    f"takes more than {_MAX_STEPS} steps (with the other eval tags of the config's "
                    "files)"
                )
            )
        if isinstance(node, ast.Constant):
            value = node.value
        elif isinstance(node, ast.Name):
            if node.id not in names:
                raise _BadArithmetic(self._says(f"uses {node.id!r} before it is bound"))
            value = names[node.id]
        elif isinstance(node, (ast.List, ast.Tuple)):
            value = []
            for element in node.elts:
                self._place(self._eval(element, names), value)
            value = self._made(value if isinstance(node, ast.List) else tuple(value))
        elif isinstance(node, ast.ListComp):
            value = []
            self._comprehend(node.elt, node.generators, names, value)
            self._made(value)
        elif isinstance(node, ast.UnaryOp):
            value = _UNARY[type(node.op)](self._number(self._eval(node.operand, names)))
        else:
            value = self._binary(node, names)
        return self._checked(value)

    def _comprehend(
        self,
        element: ast.AST,
        generators: List[ast.comprehension],
        names: Dict[str, Any],
        out: List[Any],
    ) -> None:
        if not generators:
            self._place(self._eval(element, names), out)
            self._checked(out)
            return
        # Python's scoping: the first iterable is evaluated where the comprehension is, each
        # later one with the earlier loop variables bound.
        iterable = self._eval(generators[0].iter, names)
        if not isinstance(iterable, (list, tuple)):
            raise _BadArithmetic(self._says(f"iterates over {iterable!r}, not a list"))
        for value in iterable:
            self._comprehend(
                element, generators[1:], {**names, generators[0].target.id: value}, out
            )

    def _place(self, value: Any, into: List[Any]) -> None:
        """Appends ``value`` to the list being made, counting the elements it adds."""
        made = self._lists.get(id(value)) if isinstance(value, (list, tuple)) else None
        if made is None:  # a number
            added = 1
        elif made[2]:  # placed before: all its elements again
            added = made[1]
        else:  # its elements were counted as it was made
            added, made[2] = 0, True
        into.append(value)
        self._count(added)

    def _made(self, value: Any) -> Any:
        """Records a list or tuple just made (its elements: itself and what was placed in it)."""
        elements = 1
        for item in value:
            made = self._lists.get(id(item)) if isinstance(item, (list, tuple)) else None
            elements += 1 if made is None else made[1]
        self._lists[id(value)] = [value, elements, False]
        self._count(1)
        return value

    def _count(self, added: int) -> None:
        self.budget.elements += added
        if self.budget.elements > _MAX_ELEMENTS:
            raise _BadArithmetic(
                self._says(
                    f"makes more than {_MAX_ELEMENTS} elements (numbers and lists, a reused list "
                    "counted each time it is placed; with the other eval tags of the config's "
                    "files)"
                )
            )

    def _binary(self, node: ast.BinOp, names: Dict[str, Any]) -> Any:
        left = self._number(self._eval(node.left, names))
        right = self._number(self._eval(node.right, names))
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
            # |left| ** right >= 2 ** ((bits - 1) * right): refused before it is computed.
            if right > 0 and abs(left) > 1 and (left.bit_length() - 1) * right > _MAX_INT_BITS:
                raise _BadArithmetic(
                    self._says(f"makes an integer of more than {_MAX_INT_BITS} bits")
                )
        try:
            return _BINARY[type(node.op)](left, right)
        except ArithmeticError as e:  # division by zero, float overflow
            raise _BadArithmetic(self._says(f"fails: {e}")) from e

    def _number(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            raise _BadArithmetic(self._says("applies arithmetic to a list"))
        return value

    def _checked(self, value: Any) -> Any:
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            raise _BadArithmetic(self._says(f"makes an integer of more than {_MAX_INT_BITS} bits"))
        if isinstance(value, float) and not math.isfinite(value):
            raise _BadArithmetic(self._says(f"makes {value}, a number that is not finite"))
        if isinstance(value, (list, tuple)) and len(value) > _MAX_LIST_LENGTH:
            raise _BadArithmetic(self._says(f"makes a list of more than {_MAX_LIST_LENGTH} items"))
        if not isinstance(value, (int, float, list, tuple)):
            raise _BadArithmetic(self._says(f"makes {value!r}, a {type(value).__name__} number"))
        return value


class _Loader(yaml.SafeLoader):
    """yaml's safe loader plus the arithmetic eval tag, computed by :class:`_Arithmetic`."""

    def __init__(self, stream: Any, budget: Optional[_Budget] = None):
        super().__init__(stream)
        # Of all the eval tags of the config's files: the bounds hold for them together.
        self.budget = _Budget() if budget is None else budget


def _construct_eval(loader: _Loader, node: yaml.Node) -> Any:
    args = loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None
    if not args or len(args) != 1 or not isinstance(args[0], str):
        raise _UnsafeTag(f"{node.tag} with arguments other than one expression string")
    return _Arithmetic(args[0], loader.budget).evaluate()


def _load_yaml(stream: Any, budget: _Budget) -> Any:
    """``yaml.load(stream, Loader=_Loader)``, the eval tags within ``budget``."""
    loader = _Loader(stream, budget)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _count_values(data: Any, budget: _Budget) -> None:
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
            or more than 1,000,000 values counting each use of a YAML alias; when the chain
            includes itself; or when its ``_BASE_`` entries number more than 64 (each resolved
            file is read once per call, a file named again counted again).
        FileNotFoundError: a ``_BASE_`` file is missing; the message names the entry, the file
            that names it, the folder it was looked for in, and the fix.
    """
    return _read(path, top=path, chain=(), budget=_Budget(), read={})


def _read(
    path: str,
    top: str,
    chain: Tuple[str, ...],
    budget: _Budget,
    read: Dict[str, Tuple[ConfigFile, int]],
) -> ConfigFile:
    """Reads ``path`` and its bases into ``read`` (resolved path -> the file, and the number of
    _BASE_ entries beneath it), each resolved path once."""
    if path in chain:
        raise ValueError(f"Config file {top}: {path} includes itself through _BASE_")
    within = f"Config file {top} (or one of its _BASE_ files)"
    try:
        with PathManager.open(path, "r") as f:
            data = _load_yaml(f, budget)
    except (yaml.constructor.ConstructorError, _UnsafeTag) as e:
        raise ValueError(
            f"{within} holds a YAML tag that builds Python objects, which could run code while "
            "loading; refused. Configs hold only plain values (numbers, strings, lists, "
            "mappings), or arithmetic on numbers through !!python/object/apply:eval as "
            f"detectron2's model zoo writes anchor sizes. In {path}: {e}"
        ) from e
    except _BadArithmetic as e:
        raise ValueError(
            f"{within}: in {path}, {e}; refused. The eval tag's arithmetic is bounded: {_BOUNDS}."
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


# The configs/ folder of this checkout (absent from a wheel): a config copied out of it finds its
# base there.
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _base_file(path: str, entry: str) -> str:
    base = os.path.expanduser(entry) if entry.startswith("~") else entry
    if base.startswith(("http://", "https://")):
        return base
    if not base.startswith("/"):
        base = os.path.join(os.path.dirname(path), base)
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
