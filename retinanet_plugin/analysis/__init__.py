"""Pictures and numbers a detection user expects around training: the model's size and cost
(:func:`model_cost`)."""

from .cost import count_parameters, format_model_cost, model_cost

__all__ = ["count_parameters", "format_model_cost", "model_cost"]
