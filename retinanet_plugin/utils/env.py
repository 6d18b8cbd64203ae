"""What the installed detectron2 can do."""

__all__ = ["has_compiled_ops"]


def has_compiled_ops() -> bool:
    """Whether ``detectron2._C`` holds detectron2's compiled C++/CUDA ops.

    This project can install detectron2 from a source distribution without its C++ sources; its
    install script then puts a placeholder module at ``detectron2/_C.py`` that sets
    ``IS_PLACEHOLDER = True``. Code with a compiled fast path (e.g. ``COCOEvaluator``'s
    ``use_fast_impl``, which needs ``detectron2._C.COCOevalMaxDets``) checks this first.
    """
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_PLACEHOLDER", False)
