"""Whether the learning-rate schedule fits ``SOLVER.MAX_ITER``.

``SOLVER.STEPS`` and ``SOLVER.WARMUP_ITERS`` are iteration numbers, not fractions of the run:
overriding ``SOLVER.MAX_ITER`` alone leaves them where the config put them. A step at or beyond
``MAX_ITER`` never comes, so a shortened run keeps its full learning rate to the end (detectron2
drops steps beyond it with a warning that names neither them nor a fix, and one at it silently);
a warm-up as long as the run never reaches ``SOLVER.BASE_LR``. :func:`warn_on_schedule` says so
before training, with an override that fits; it changes nothing, as the user may mean it.
"""

import logging
from typing import List, Optional, Sequence

from detectron2.config import CfgNode

from ..config import load_config

__all__ = ["schedule_problems", "warn_on_schedule"]

logger = logging.getLogger(__name__)

# detectron2's COCO 1x schedule (MAX_ITER 90000, STEPS (60000, 80000), WARMUP_ITERS 1000): the
# shape suggested when the MAX_ITER the schedule was set for is unknown; its last decay comes at
# 8/9 of the run, its warm-up ends at 1/90.
_1X_MAX_ITER = 90000
_1X_LAST_STEP = 80000
_1X_WARMUP_ITERS = 1000


def _as_tuple(values: Sequence[int]) -> str:
    return "(" + ", ".join(str(v) for v in values) + ("," if len(values) == 1 else "") + ")"


def _scale(planned: Optional[CfgNode], max_iter: int) -> Optional[float]:
    """new MAX_ITER / the config file's, when the command line changed it."""
    if planned is None or planned.SOLVER.MAX_ITER in (0, max_iter):
        return None
    return max_iter / planned.SOLVER.MAX_ITER


def _steps_fix(steps: List[int], max_iter: int, planned: Optional[CfgNode]) -> str:
    scale = _scale(planned, max_iter)
    if scale is not None and list(planned.SOLVER.STEPS) == steps:
        scaled = [round(step * scale) for step in steps]
        if all(0 < step < max_iter for step in scaled) and len(set(scaled)) == len(scaled):
            return (
                f'SOLVER.STEPS "{_as_tuple(scaled)}" (x {max_iter} / {planned.SOLVER.MAX_ITER}, '
                "as SOLVER.MAX_ITER from the config file's value)"
            )
    scale = max_iter * _1X_LAST_STEP / _1X_MAX_ITER / max(steps)
    # Distinct and inside (0, MAX_ITER): possibly fewer steps for a run of a few iterations.
    fitted = [step for step in sorted({round(s * scale) for s in steps}) if 0 < step < max_iter]
    return (
        f'e.g. SOLVER.STEPS "{_as_tuple(fitted)}" (their proportions, the last at 8/9 of '
        "MAX_ITER as in detectron2's 1x schedule)"
    )


def _warmup_fix(warmup: int, max_iter: int, planned: Optional[CfgNode]) -> str:
    scale = _scale(planned, max_iter)
    if scale is not None and planned.SOLVER.WARMUP_ITERS == warmup:
        scaled = round(warmup * scale)
        if scaled < max_iter:
            return (
                f"SOLVER.WARMUP_ITERS {scaled} (x {max_iter} / {planned.SOLVER.MAX_ITER}, as "
                "SOLVER.MAX_ITER from the config file's value)"
            )
    fitted = min(max_iter - 1, max(1, round(max_iter * _1X_WARMUP_ITERS / _1X_MAX_ITER)))
    return (
        f"e.g. SOLVER.WARMUP_ITERS {fitted} (1/90 of MAX_ITER as in detectron2's 1x schedule)"
    )


def schedule_problems(cfg: CfgNode, planned: Optional[CfgNode] = None) -> List[str]:
    """What in ``cfg.SOLVER`` does not fit ``SOLVER.MAX_ITER``, one sentence each, naming the
    keys, their values and an override that fits; empty when the schedule fits.

    Checked: with ``LR_SCHEDULER_NAME`` "WarmupMultiStepLR" (the one that reads ``STEPS``), no
    step at or beyond ``MAX_ITER``; a warm-up (``WARMUP_ITERS``) shorter than ``MAX_ITER``.

    Args:
        cfg: the run's config.
        planned: the config as its file sets it, before the command-line overrides. When only
            ``MAX_ITER`` was overridden, the override suggested is the file's ``STEPS`` and
            ``WARMUP_ITERS`` scaled by the new ``MAX_ITER`` / the file's; otherwise (unknown,
            or the file's own schedule does not fit) the shape of detectron2's 1x schedule.
    """
    solver = cfg.SOLVER
    max_iter = solver.MAX_ITER
    if max_iter <= 0:
        return []  # nothing trains
    problems = []
    steps = list(solver.STEPS)
    late = [step for step in steps if step >= max_iter]
    if solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and late:
        problems.append(
            f"SOLVER.STEPS {_as_tuple(steps)} with SOLVER.MAX_ITER {max_iter}: the learning rate "
            f"never decays at {', '.join(str(s) for s in late)} (at or beyond MAX_ITER; steps do "
            f"not follow MAX_ITER). Scale them with it: {_steps_fix(steps, max_iter, planned)}"
        )
    if solver.WARMUP_ITERS >= max_iter:
        problems.append(
            f"SOLVER.WARMUP_ITERS {solver.WARMUP_ITERS} with SOLVER.MAX_ITER {max_iter}: the run "
            f"ends in its warm-up, below SOLVER.BASE_LR {solver.BASE_LR}. Scale it with "
            f"MAX_ITER: {_warmup_fix(solver.WARMUP_ITERS, max_iter, planned)}"
        )
    return problems


def warn_on_schedule(cfg: CfgNode, config_file: Optional[str] = None) -> List[str]:
    """Logs a warning for each of :func:`schedule_problems`; the config is left as it is.

    Args:
        cfg: the run's config.
        config_file: the YAML file ``cfg`` was read from (``--config-file``); read again
            without overrides when the schedule does not fit, for the ``MAX_ITER`` its
            ``STEPS`` and ``WARMUP_ITERS`` were set for.

    Returns:
        list[str]: the warnings.
    """
    problems = schedule_problems(cfg)
    if problems and config_file:
        problems = schedule_problems(cfg, load_config(config_file))
    for problem in problems:
        logger.warning("%s", problem)
    return problems
