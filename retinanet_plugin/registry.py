"""Looking up a registered component by the name a config key gives."""

from typing import Any, Sequence

__all__ = ["UnknownNameError", "get_registered"]


class UnknownNameError(KeyError, ValueError):
    """A config key names nothing in its registry (a KeyError and a ValueError, so callers of
    either kind of lookup catch it)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would print the message quoted


def get_registered(registry, name: str, key: str) -> Any:
    """``registry.get(name)``, failing with the config key and the registered names.

    Args:
        registry (detectron2.utils.registry.Registry): where to look.
        name (str): the name the config gives.
        key (str): the config key that gave it, e.g. "MODEL.RETINANET.CLS_LOSS".
    """
    if name not in registry:
        registered: Sequence[str] = sorted(k for k, _ in registry)
        raise UnknownNameError(f"{key} = {name!r} is not registered; registered: {registered}")
    return registry.get(name)
