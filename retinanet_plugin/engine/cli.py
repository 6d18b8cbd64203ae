"""``train_net.py``'s command line: detectron2's flags, also after the config overrides, and a
run that ends with its data's problems, not a traceback.

detectron2's ``default_argument_parser`` takes everything after the first ``KEY VALUE`` pair as
overrides (``argparse.REMAINDER``), so ``... SOLVER.MAX_ITER 10 --resume``, the order in which
one adds a flag to a command, fails later with "Override list has odd length" (or, with an even
count, reads ``--resume`` as a config key that does not exist). :func:`argument_parser` moves
its own flags out of the overrides.

A dataset that fails its check before training (:func:`~retinanet_plugin.data.check_datasets`:
an unknown category id, a truncated image, an unregistered dataset name) is the user's data, not
a bug: :func:`run_main` ends such a run with the list of problems as its last lines and exit
status 1, also when the check failed in one of several processes.
"""

import argparse
import functools
import glob
import os
import sys
import traceback
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from torch.multiprocessing import ProcessRaisedException

from detectron2.engine import default_argument_parser

from ..data.coco_check import CocoCheckError
from ..data.registration import check_datasets, register_config_datasets
from .launch import launch

__all__ = [
    "ArgumentParser",
    "DataError",
    "FilesThenOverrides",
    "argument_parser",
    "looks_like_override",
    "move_trailing_overrides",
    "run_main",
]

DATA_ERROR_EXIT_STATUS = 1

_FLAGS_ANYWHERE = """
Flags may come before or after the KEY VALUE pairs:
    $ {prog} --config-file cfg.yaml SOLVER.MAX_ITER 1000 --resume
"""


class DataError(Exception):
    """The data a run names cannot be used; the message lists the problems, one per line."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose options may also follow the trailing ``opts`` (the config's
    ``KEY VALUE`` pairs): after parsing, any of its own option strings found in ``opts`` (with
    the values the option takes) is parsed as that option and removed from ``opts``. The
    ``opts`` left must come in pairs; otherwise the parser exits with an error naming them."""

    def parse_known_args(
        self, args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None
    ) -> Tuple[argparse.Namespace, List[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        opts = getattr(namespace, "opts", None)
        if not opts:
            return namespace, extras
        flags, opts = self._split_flags(opts)
        if flags:
            # ``opts`` comes back empty from this parse: set it after.
            namespace, more = super().parse_known_args(flags, namespace)
            extras += more
        namespace.opts = opts
        # A Python (lazy) config takes key=value words, not KEY VALUE pairs.
        lazy = str(getattr(namespace, "config_file", "")).endswith(".py")
        if len(opts) % 2 and not lazy:
            self.error(self._odd_opts_message(opts))
        return namespace, extras

    def _split_flags(self, opts: Sequence[str]) -> Tuple[List[str], List[str]]:
        """(this parser's options in ``opts`` with their values, the rest in order)."""
        flags: List[str] = []
        rest: List[str] = []
        i = 0
        while i < len(opts):
            name, has_value = opts[i].split("=", 1)[0], "=" in opts[i]
            action = self._option_string_actions.get(name)
            if action is None:
                rest.append(opts[i])
                i += 1
                continue
            # store_true takes 0 values, detectron2's other options 1 (nargs None)
            takes = action.nargs if isinstance(action.nargs, int) else 1
            end = i + 1 + (0 if has_value else takes)
            flags += opts[i:end]
            i = end
        return flags, rest

    def _odd_opts_message(self, opts: Sequence[str]) -> str:
        message = (
            f"the config overrides after the flags come in KEY VALUE pairs; got {len(opts)} "
            f"words: {' '.join(opts)}"
        )
        unknown = [word for word in opts if word.startswith("--")]
        if unknown:
            known = sorted(s for s in self._option_string_actions if s.startswith("--"))
            message += f" ({', '.join(unknown)}: not among the flags {', '.join(known)})"
        return message


# The first word of a config override: a YAML config's top-level keys (detectron2's; the plugin
# adds none at the top) and a lazy config's top-level nodes (``node.key=value`` words).
_YAML_TOP_KEYS = frozenset({
    "CUDNN_BENCHMARK", "DATALOADER", "DATASETS", "FLOAT32_PRECISION", "GLOBAL", "INPUT", "MODEL",
    "OUTPUT_DIR", "SEED", "SOLVER", "TEST", "VERSION", "VIS_PERIOD",
})
_LAZY_TOP_NODES = frozenset({"dataloader", "lr_multiplier", "model", "optimizer", "train"})


def looks_like_override(word: str) -> bool:
    """Whether ``word`` starts the config overrides rather than naming files: it is not an
    existing path, its key (before any ``=``) holds no folder separator or glob character, and
    it is a YAML key under a top-level key (``MODEL.DEVICE``, ``SEED``) or a lazy config's
    ``node.key=value`` word (``model.test_score_thresh=0.3``)."""
    key, is_word = word.split("=", 1)[0], "=" in word
    if os.path.exists(word) or glob.has_magic(key) or "/" in key or "\\" in key:
        return False
    top = key.split(".", 1)[0]
    return top in _LAZY_TOP_NODES if is_word else top in _YAML_TOP_KEYS


# Where FilesThenOverrides keeps the overrides it finds, until move_trailing_overrides.
_MOVED = "_overrides_after_files"


class FilesThenOverrides(argparse.Action):
    """The action of a list option (``nargs`` "+" or "*") of files followed, perhaps, by config
    overrides: such an option takes every word after it, so ``--input a.png MODEL.DEVICE cpu``
    would read the override as two more files. From the first word that
    :func:`looks_like_override`, the words are kept aside for :func:`move_trailing_overrides`.
    The files of every occurrence of the option are kept, in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        values = list(values)
        split = next((i for i, w in enumerate(values) if looks_like_override(w)), len(values))
        files = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, files + values[:split])
        setattr(namespace, _MOVED, list(getattr(namespace, _MOVED, [])) + values[split:])


def move_trailing_overrides(namespace: argparse.Namespace) -> List[str]:
    """Puts the overrides that :class:`FilesThenOverrides` options set aside in front of
    ``namespace.opts`` (and drops a ``--`` that starts ``opts``).

    Returns:
        list[str]: the words moved.
    """
    moved = list(vars(namespace).pop(_MOVED, []))
    opts = list(getattr(namespace, "opts", None) or [])
    if opts[:1] == ["--"]:
        opts = opts[1:]
    namespace.opts = moved + opts
    return moved


def argument_parser(epilog: Optional[str] = None) -> ArgumentParser:
    """detectron2's ``default_argument_parser(epilog)`` (same flags, defaults and help) as an
    :class:`ArgumentParser`, so that the flags may also follow the ``KEY VALUE`` pairs."""
    base = default_argument_parser(epilog)
    return ArgumentParser(
        prog=base.prog,
        description=base.description,
        epilog=(base.epilog or "") + _FLAGS_ANYWHERE.format(prog=base.prog),
        formatter_class=base.formatter_class,
        parents=[base],
        add_help=False,  # the parent's -h is copied
    )


def _raised_by_data_check(error: BaseException) -> bool:
    """Whether ``error`` is about the data the config names: any :class:`CocoCheckError`, or a
    ``ValueError`` / ``FileNotFoundError`` raised while the datasets were registered or checked
    (an unregistered name, a bad ``DATASETS.CHECK``, a JSON file that is not there)."""
    if isinstance(error, CocoCheckError):
        return True
    if not isinstance(error, (ValueError, FileNotFoundError)):
        return False
    checks = (check_datasets.__code__, register_config_datasets.__code__)
    return any(frame.f_code in checks for frame, _ in traceback.walk_tb(error.__traceback__))


def _main_checked(main_func: Callable[..., Any], *args: Any) -> Any:
    """``main_func(*args)`` in each process; a data error becomes a :class:`DataError`."""
    try:
        return main_func(*args)
    except (ValueError, FileNotFoundError) as e:
        if not _raised_by_data_check(e):
            raise
        raise DataError(str(e)) from None


def _data_error_message(child_traceback: str) -> Optional[str]:
    """The message of a :class:`DataError` that ended a child process, from the traceback text
    torch's launcher hands the parent; None when another exception ended it."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    start = child_traceback.rfind(marker)
    if start < 0:
        return None
    return child_traceback[start + len(marker) :].rstrip("\n")


def _print_problems(message: str) -> None:
    sys.stdout.flush()  # the log first (stdout is buffered when redirected), the problems last
    print("Stopped before building the model; the data has these problems:", file=sys.stderr)
    print(message, file=sys.stderr, flush=True)


def run_main(
    main_func: Callable[[argparse.Namespace], Any],
    args: argparse.Namespace,
    *,
    device: Union[str, Callable[[], str], None] = None,
) -> None:
    """Runs ``main_func(args)`` in the processes ``args`` asks for (see :func:`launch`).

    Args:
        main_func: ``train_net.py``'s ``main``; picklable (a module-level function) for several
            processes.
        args: from :func:`argument_parser` (``num_gpus``, ``num_machines``, ``machine_rank``,
            ``dist_url``).
        device: the configured ``MODEL.DEVICE``, which picks the processes' backend, or a
            function that reads it from the config (a data error raised while reading it, as
            a ``.py`` config registers its datasets when loaded, ends the run as one raised in
            ``main_func``).

    Raises:
        SystemExit: status 1, when the data failed its check (see
            :func:`_raised_by_data_check`), after printing the problems, one per line, as the
            last lines on stderr, without a traceback. Any other error propagates as it is.
    """
    try:
        if callable(device):
            device = _main_checked(device)
        launch(
            functools.partial(_main_checked, main_func),
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            device=device,
        )
        return
    except DataError as e:  # one process: raised here
        message = str(e)
    except ProcessRaisedException as e:  # several: raised in a child, handed over as text
        message = _data_error_message(e.msg)
        if message is None:
            raise
    _print_problems(message)
    raise SystemExit(DATA_ERROR_EXIT_STATUS)
