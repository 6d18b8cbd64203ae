"""Config changes the analysis advises, as override words for ``train_net.py``, and the verdict.

A change is a dict of YAML keys and values; :func:`yaml_arguments` writes it as the KEY VALUE
words ``train_net.py`` (and :func:`retinanet_plugin.config.load_config`) merge, each value a
Python literal that ``CfgNode.merge_from_list`` decodes back to the same value. A ``.py``
config's ``key=value`` words are written by the command line, which knows its nodes.
"""

import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .coverage import Coverage

# The default margin: a change is advised only if it gives at least this many more percentage
# points of boxes (box-size pairs) a foreground anchor.
DEFAULT_MIN_GAIN = 1.0


def literal(value: Any) -> str:
    """``value`` as a Python literal with double-quoted strings (one shell word once quoted;
    ``ast.literal_eval``, which both config systems use on override values, reads it back)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return repr(float(value))
    return repr(value)


def yaml_arguments(changes: Dict[str, Any]) -> List[str]:
    """KEY VALUE words for ``train_net.py`` / ``load_config``'s ``opts``."""
    return [word for key, value in changes.items() for word in (key, literal(value))]


def shell_lines(arguments: Sequence[str], syntax: str) -> List[str]:
    """The override words as shell text, one KEY VALUE pair (YAML) or key=value word (.py) a
    line, each line but the last continued with a backslash: paste after ``train_net.py
    --config-file CONFIG``."""
    if syntax == "yaml":
        pairs = [f"{arguments[i]} {shlex.quote(arguments[i + 1])}"
                 for i in range(0, len(arguments), 2)]
    else:
        pairs = [shlex.quote(word) for word in arguments]
    return [p + (" \\" if i < len(pairs) - 1 else "") for i, p in enumerate(pairs)]


@dataclass
class Advice:
    """One change tried on the config, measured by re-running the analysis with it."""

    kind: str  # "anchors" (the proposal's sizes / ratios), "finer level", "coarser level"
    title: str
    changes: Dict[str, Any]  # YAML key -> value
    arguments: List[str]  # the override words for this config (YAML or .py)
    coverage: Optional[Coverage] = None
    error: str = ""  # why it could not be measured
    extra: Dict[str, Any] = field(default_factory=dict)

    def keys(self) -> List[str]:
        """The keys the override words set (``key=value`` words of a .py config, else the KEY
        of each KEY VALUE pair; YAML keys never hold "=")."""
        if self.arguments and "=" in self.arguments[0]:
            return [w.split("=", 1)[0] for w in self.arguments]
        return list(self.arguments[::2])

    def gain(self, baseline: Coverage) -> float:
        """Percentage points of boxes (box-size pairs) that gain a foreground anchor."""
        before, after = baseline.foreground, self.coverage.foreground
        if not len(before) or not len(after):
            return 0.0
        return 100.0 * (float(after.mean()) - float(before.mean()))


def foreground_pct(cov: Coverage) -> float:
    """Percent of box-size pairs with a foreground anchor, as the tables round it."""
    return round(100.0 * float(cov.foreground.mean()), 2) if len(cov.foreground) else 0.0


def verdict(baseline: Coverage, advice: Sequence[Advice], min_gain: float) -> Dict[str, Any]:
    """The one-line verdict and the advised change, or none.

    Of the changes that gain at least ``min_gain`` points, the cheapest (fewest anchors per
    image, ``extra["anchors_per_image"]`` when known; then the largest gain, then the higher mean
    best IoU) is advised, unless a costlier one gains at least ``min_gain`` points more: a finer
    level quadruples the head's work, which a tie in coverage does not pay for.
    """
    before = foreground_pct(baseline)
    measured = [a for a in advice if a.coverage is not None]
    helping = [a for a in measured if a.gain(baseline) >= min_gain - 1e-9]
    if not helping:
        best = max(measured, key=lambda a: a.gain(baseline), default=None)
        tried = (f"the best of {len(measured)} changes tried gains "
                 f"{best.gain(baseline):+.2f} points" if best else "no change found to try")
        if 100.0 - before < min_gain:  # too few boxes left uncovered for any change to help
            line = (f"anchors fit: {before:.2f}% of boxes have a foreground anchor; no change "
                    f"needed ({tried}; --min-gain {min_gain:g})")
        else:
            line = (f"no change advised: {before:.2f}% of boxes have a foreground anchor, but "
                    f"{tried}, under --min-gain {min_gain:g}")
        return {"line": line, "advised": None, "before_pct": before}
    def cost(a: Advice) -> int:
        return int(a.extra.get("anchors_per_image", 0))

    ranked = sorted(helping, key=lambda a: (cost(a), -a.gain(baseline),
                                            -a.coverage.objective()[1]))
    best = ranked[0]
    for a in ranked[1:]:
        if cost(a) > cost(best) and a.gain(baseline) >= best.gain(baseline) + min_gain - 1e-9:
            best = a
    line = (f"change the config: {best.title} gives {before:.2f}% -> "
            f"{foreground_pct(best.coverage):.2f}% of boxes with a foreground anchor "
            f"({best.gain(baseline):+.2f} points >= --min-gain {min_gain:g}); keys: "
            + ", ".join(best.keys()))
    return {"line": line, "advised": advice.index(best), "before_pct": before}
