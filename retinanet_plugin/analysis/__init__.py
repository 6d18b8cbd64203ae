"""Pictures and numbers a detection user expects around training.

- :mod:`.browse`: training images after the training mapper (or as registered), boxes drawn
  (``python -m retinanet_plugin.tools.browse_data``);
- :mod:`.curves`: ``results.csv`` and ``training_curves.png`` from ``metrics.json`` (written at
  the end of training by :class:`retinanet_plugin.engine.TrainingCurvesHook`;
  ``python -m retinanet_plugin.tools.training_curves``);
- :mod:`.cost`: parameters and FLOPs at the test size (:func:`model_cost`;
  ``python -m retinanet_plugin.tools.model_cost``).
"""

from .browse import browse_samples, draw_sample, save_browse
from .cost import count_parameters, format_model_cost, model_cost
from .curves import read_metrics, write_results_csv, write_training_curves

__all__ = [
    "browse_samples",
    "count_parameters",
    "draw_sample",
    "format_model_cost",
    "model_cost",
    "read_metrics",
    "save_browse",
    "write_results_csv",
    "write_training_curves",
]
