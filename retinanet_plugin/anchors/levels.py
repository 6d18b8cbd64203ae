"""Moving the anchors one pyramid level finer or coarser: the config keys that must change
together, computed from the config and its built backbone.

Finer (boxes too small for the finest grid, :func:`~.coverage.too_small_for_grid`): the FPN
takes the next finer bottom-up stage (``res2`` below ``res3``; stage ``resN`` has stride 2^N in
detectron2's ResNet and in the plugin's MobileNetV2), so it outputs ``p2``; the head's
``IN_FEATURES`` move one level down and keep their number, so the head's weights (shared across
levels) and a checkpoint still fit. Coarser: the head moves one level up, when the backbone
already outputs a coarser level than the head reads (detectron2's ``LastLevelP6P7`` top block
makes P6 and P7 only, so a coarser level than P7 needs another top block: no key makes one).

Two anchor sizes are tried with each move: each level keeps its size / stride ratio (sizes
halved going finer, so the new level gets half the old finest sizes and every other level the
anchors it had: one finer level added, the coarsest dropped), or each level keeps its sizes
(every anchor on a grid twice as fine). Each is measured, not estimated, by the caller
(:func:`~.analysis.analyze` re-runs the analysis on the changed config).
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from detectron2.config import CfgNode
from detectron2.modeling import Backbone

from .layout import anchor_head_key, anchor_head_node

_LEVEL = re.compile(r"^p(\d+)$")
_STAGE = re.compile(r"^res(\d+)$")


@dataclass
class LevelMove:
    """One way of moving the anchors a level finer or coarser, as YAML config changes."""

    title: str
    changes: Dict[str, Any]  # YAML key -> new value
    # The head's new levels' strides, for configs whose generator lists them (a .py config's).
    strides: List[int] = field(default_factory=list)


def _levels(names: List[str], key: str) -> List[int]:
    numbers = [_LEVEL.match(n) for n in names]
    if not all(numbers):
        raise ValueError(f"{key} {names}: level names are not p<N>")
    return [int(m.group(1)) for m in numbers]


def _scaled(sizes: List[List[float]], factor: float) -> List[List[float]]:
    return [[round(float(s) * factor, 2) for s in level] for level in sizes]


def finer_level_moves(cfg: CfgNode, backbone: Backbone) -> Tuple[List[LevelMove], str]:
    """The changes that add the next finer FPN level and move the head's levels onto it.

    Args:
        cfg: the config's YAML keys (a .py config's converted ones).
        backbone: the config's backbone, built (read for its FPN inputs and bottom-up).

    Returns:
        (moves, reason): the moves (empty when none can be derived) and, when empty, why.
    """
    head_key = anchor_head_key(cfg)
    head = list(anchor_head_node(cfg).IN_FEATURES)
    bottom_up = getattr(backbone, "bottom_up", None)
    fpn_in = list(getattr(backbone, "in_features", []) or [])
    if bottom_up is None or not fpn_in:
        return [], f"the backbone ({type(backbone).__name__}) is not an FPN"
    try:
        levels = _levels(head, f"{head_key}.IN_FEATURES")
    except ValueError as e:
        return [], str(e)
    stages = [_STAGE.match(n) for n in fpn_in]
    if not all(stages):
        return [], f"MODEL.FPN.IN_FEATURES {fpn_in}: stage names are not res<N>"
    finest_stage = min(int(m.group(1)) for m in stages)
    new_stage = f"res{finest_stage - 1}"
    known = getattr(bottom_up, "_out_feature_strides", {})
    if levels[0] > finest_stage:
        new_fpn = fpn_in  # the FPN already outputs a finer level than the head reads
    elif new_stage in known:
        new_fpn = [new_stage] + fpn_in
    else:
        return [], (f"the FPN's finest input {fpn_in[0]} has no finer res<N> stage in "
                    f"{type(bottom_up).__name__} (its stages: {sorted(known)})")
    changes: Dict[str, Any] = {}
    if new_fpn != fpn_in:
        changes["MODEL.FPN.IN_FEATURES"] = new_fpn
        # detectron2's ResNet outputs MODEL.RESNETS.OUT_FEATURES, which the FPN inputs must be in;
        # the plugin's MobileNetV2 outputs the FPN's inputs themselves.
        if type(bottom_up).__name__ == "ResNet":
            out = list(cfg.MODEL.RESNETS.OUT_FEATURES)
            changes["MODEL.RESNETS.OUT_FEATURES"] = [new_stage] + [s for s in out
                                                                   if s != new_stage]
    changes[f"{head_key}.IN_FEATURES"] = [f"p{n - 1}" for n in levels]
    strides = [2 ** (n - 1) for n in levels]
    return _size_variants(cfg, changes, strides, 0.5, "one level finer"), ""


def coarser_level_moves(cfg: CfgNode, shapes: Dict[str, Any]) -> Tuple[List[LevelMove], str]:
    """The changes that move the head's levels one up, when the backbone outputs that level.

    Args:
        cfg: the config's YAML keys.
        shapes: the backbone's output shapes (name -> ShapeSpec).
    """
    head_key = anchor_head_key(cfg)
    head = list(anchor_head_node(cfg).IN_FEATURES)
    try:
        levels = _levels(head, f"{head_key}.IN_FEATURES")
    except ValueError as e:
        return [], str(e)
    new = f"p{levels[-1] + 1}"
    if new not in shapes:
        return [], (f"the backbone outputs no level coarser than {head[-1]} (it outputs "
                    f"{sorted(shapes)}; detectron2's LastLevelP6P7 makes P6 and P7 only)")
    changes: Dict[str, Any] = {f"{head_key}.IN_FEATURES": [f"p{n + 1}" for n in levels]}
    strides = [2 ** (n + 1) for n in levels]
    return _size_variants(cfg, changes, strides, 2.0, "one level coarser"), ""


def _size_variants(cfg: CfgNode, changes: Dict[str, Any], strides: List[int], factor: float,
                   what: str) -> List[LevelMove]:
    """The move with each level's size / stride kept (sizes times ``factor``), and with each
    level's sizes kept."""
    sizes = [list(map(float, s)) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    head = changes[f"{anchor_head_key(cfg)}.IN_FEATURES"]
    what = f"{what} ({head[0]}-{head[-1]})"
    return [
        LevelMove(f"{what}, anchor sizes x {factor:g}",
                  {**changes, "MODEL.ANCHOR_GENERATOR.SIZES": _scaled(sizes, factor)}, strides),
        LevelMove(f"{what}, anchor sizes kept", dict(changes), strides),
    ]
