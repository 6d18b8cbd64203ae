"""The eval tag's arithmetic: a small interpreter with fixed bounds, never Python's eval.

detectron2's model-zoo Base-RetinaNet.yaml writes its anchor sizes with
``!!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3)] for x in [32, 64, 128, 256,
512]]"]``. :class:`Arithmetic` computes such an expression as Python would, over numbers, lists,
tuples and list comprehensions, within the bounds below, for the YAML reader in
:mod:`retinanet_plugin.config_file` (its only user).
"""

import ast
import math
import operator
from typing import Any, Dict, List, Optional

__all__ = ["BOUNDS", "Arithmetic", "BadArithmetic", "Budget", "UnsafeTag"]

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
BOUNDS = (
    f"integers of at most {_MAX_INT_BITS} bits, finite floats, lists of at most "
    f"{_MAX_LIST_LENGTH} items, {_MAX_ELEMENTS} elements (numbers and lists, a reused list counted "
    f"each time it is placed) and {_MAX_STEPS} steps in all of a config's files"
)
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.List, ast.Tuple,
          ast.ListComp, ast.comprehension, ast.BinOp, ast.UnaryOp, *_BINARY, *_UNARY)  # fmt: skip


class UnsafeTag(Exception):
    """A YAML tag, or an eval expression, that would build Python objects other than numbers in
    lists (and so could run code)."""


class BadArithmetic(Exception):
    """Arithmetic in an eval tag that fails in Python or exceeds the bounds above."""


class Budget:
    """What one config's files (the file and its ``_BASE_`` chain) have used of the bounds."""

    def __init__(self) -> None:
        self.steps = 0  # of _MAX_STEPS
        self.elements = 0  # of _MAX_ELEMENTS
        self.values = 0  # of config_file._MAX_VALUES
        self.base_entries = 0  # of config_file._MAX_BASE_ENTRIES


class Arithmetic:
    """Computes an eval-tag expression as Python's eval would, over int and float constants,
    lists, tuples and list comprehensions, with ``+ - * / **`` and unary ``+ -``.

    Cost is bounded by what is computed, not by the expression's shape: each evaluated node is a
    step, a power is refused before it is computed when its result would exceed the integer
    bound, every value is checked as it is made (an int's bits, a float's finiteness, a list's
    length), and the elements of the values made are counted: a list placed into another list
    for the first time adds itself, one already placed (a loop variable, a reused value) adds all
    its elements again, so the count bounds the full size of every value, shared parts included.
    """

    def __init__(self, expression: str, budget: Optional[Budget] = None):
        """
        Args:
            expression: the eval tag's argument.
            budget: the steps and elements already taken by the earlier eval tags of the config's
                files (they share one budget), updated as this expression is computed.
        """
        self.expression = expression
        self.budget = Budget() if budget is None else budget
        # id of each list or tuple made -> [the value (kept alive), its elements, placed yet].
        self._lists: Dict[int, List[Any]] = {}

    def _says(self, what: str) -> str:
        shown = self.expression if len(self.expression) <= 200 else self.expression[:200] + "..."
        return f"eval of {shown!r} {what}"

    def evaluate(self) -> Any:
        if len(self.expression) > _MAX_EXPRESSION_CHARS:
            raise BadArithmetic(
                f"an eval expression of {len(self.expression)} characters "
                f"(at most {_MAX_EXPRESSION_CHARS})"
            )
        try:
            tree = ast.parse(self.expression, mode="eval")
        except (SyntaxError, ValueError) as e:
            raise UnsafeTag(self._says(f"does not parse: {e}")) from e
        except (RecursionError, MemoryError) as e:
            raise BadArithmetic(self._says("nests too deeply")) from e
        self._check_nodes(tree)
        try:
            return self._eval(tree.body, {})
        except RecursionError as e:
            raise BadArithmetic(self._says("nests too deeply")) from e

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
                raise UnsafeTag(
                    self._says(
                        f"uses {type(node).__name__}, not only arithmetic on numbers in lists"
                    )
                )
            if isinstance(node, ast.Constant) and type(node.value) not in (int, float):
                raise UnsafeTag(self._says(f"holds the constant {node.value!r}"))
            if isinstance(node, ast.Name) and node.id not in loop_vars:
                raise UnsafeTag(self._says(f"names {node.id!r}"))
            if isinstance(node, ast.comprehension) and (
                node.ifs or node.is_async or not isinstance(node.target, ast.Name)
            ):
                raise UnsafeTag(self._says("filters its comprehension or unpacks its variable"))

    def _eval(self, node: ast.AST, names: Dict[str, Any]) -> Any:
        self.budget.steps += 1
        if self.budget.steps > _MAX_STEPS:
            raise BadArithmetic(
                self._says(
                    f"takes more than {_MAX_STEPS} steps (with the other eval tags of the config's "
                    "files)"
                )
            )
        if isinstance(node, ast.Constant):
            value = node.value
        elif isinstance(node, ast.Name):
            if node.id not in names:
                raise BadArithmetic(self._says(f"uses {node.id!r} before it is bound"))
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
            raise BadArithmetic(self._says(f"iterates over {iterable!r}, not a list"))
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
            raise BadArithmetic(
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
                raise BadArithmetic(
                    self._says(f"makes an integer of more than {_MAX_INT_BITS} bits")
                )
        try:
            return _BINARY[type(node.op)](left, right)
        except ArithmeticError as e:  # division by zero, float overflow
            raise BadArithmetic(self._says(f"fails: {e}")) from e

    def _number(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            raise BadArithmetic(self._says("applies arithmetic to a list"))
        return value

    def _checked(self, value: Any) -> Any:
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            raise BadArithmetic(self._says(f"makes an integer of more than {_MAX_INT_BITS} bits"))
        if isinstance(value, float) and not math.isfinite(value):
            raise BadArithmetic(self._says(f"makes {value}, a number that is not finite"))
        if isinstance(value, (list, tuple)) and len(value) > _MAX_LIST_LENGTH:
            raise BadArithmetic(self._says(f"makes a list of more than {_MAX_LIST_LENGTH} items"))
        if not isinstance(value, (int, float, list, tuple)):
            raise BadArithmetic(self._says(f"makes {value!r}, a {type(value).__name__} number"))
        return value
