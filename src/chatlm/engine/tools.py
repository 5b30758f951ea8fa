"""The calculator the model may call while generating (`<|python_start|> expr <|python_end|>`).

nanochat's engine evaluates the expression and forces `<|output_start|> result <|output_end|>`
into the sequence. Here the expression is parsed with `ast` and only this is evaluated: numbers,
+ - * / // % ** (small exponents), parentheses, unary signs, and `'text'.count('x')` (the
letter-counting call of SpellingBee). Anything else returns None and nothing is forced. No eval().
"""

from __future__ import annotations

import ast
import operator
from typing import Any, Callable, Optional

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e30


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise ValueError("result out of range")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.func.value.value.count(node.args[0].value)
    raise ValueError(f"not allowed: {ast.dump(node)[:60]}")


def calculate(expression: str) -> Optional[str]:
    """The result of an arithmetic expression (or a str.count call) as text, or None."""
    text = expression.strip().replace(",", "") if "count" not in expression else expression.strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        return None
    try:
        result = _value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(round(result, 6) if isinstance(result, float) else result)
