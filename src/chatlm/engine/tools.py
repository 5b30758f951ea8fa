"""The calculator the model may call while generating (`<|python_start|> expr <|python_end|>`).

nanochat's engine evaluates the expression and forces `<|output_start|> result <|output_end|>`
into the sequence. Here the expression is parsed with `ast` and only this is evaluated: numbers,
+ - * / // % ** (small exponents), parentheses, unary signs, and `'text'.count('x')` (the
letter-counting call of SpellingBee). Anything else returns None and nothing is forced. No eval().

`sandbox_calculator` is the other executor: the expression runs as Python in [F]'s sandbox
(`chatlm.evals.sandbox`: a separate, resource-limited interpreter), which allows any expression
at the cost of a process per call. `ToolTokens` holds the protocol's token ids and turns a call
into the tokens forced after it.
"""

from __future__ import annotations

import ast
import operator
from typing import Any, Callable, Optional, Sequence

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


def sandbox_calculator(timeout_s: float = 3.0) -> Callable[[str], Optional[str]]:
    """A calculator that evaluates the expression in the sandbox; None when it fails or prints nothing."""
    from chatlm.evals.sandbox import SandboxLimits, run_code

    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)))

    def run(expression: str) -> Optional[str]:
        text = expression.strip()
        if not text or len(text) > MAX_EXPRESSION_CHARS:
            return None
        result = run_code(f"print(eval({text!r}, {{}}))", limits)
        out = result.stdout.strip()
        return out if result.passed and out and len(out) <= MAX_EXPRESSION_CHARS else None

    return run


CALCULATORS = ("calculator", "sandbox")


def calculator_for(kind: str) -> Callable[[str], Optional[str]]:
    """The tool executor by name: 'calculator' (restricted, in-process) or 'sandbox'."""
    if kind == "calculator":
        return calculate
    if kind == "sandbox":
        return sandbox_calculator()
    raise ValueError(f"unknown tool executor {kind!r}; valid: {', '.join(CALCULATORS)}")


class ToolTokens:
    """The special-token ids of the tool protocol and how to encode a result."""

    def __init__(self, tok: Any, calculator: Callable[[str], Optional[str]] = calculate):
        self.python_start = tok.encode_special("<|python_start|>")
        self.python_end = tok.encode_special("<|python_end|>")
        self.output_start = tok.encode_special("<|output_start|>")
        self.output_end = tok.encode_special("<|output_end|>")
        self.tok = tok
        self.calculator = calculator

    def forced_after(self, generated: Sequence[int]) -> list[int]:
        """The tokens to force after a row's `<|python_end|>` (empty when the call gives nothing)."""
        starts = [i for i, t in enumerate(generated) if t == self.python_start]
        if not starts:
            return []
        expression = self.tok.decode(list(generated[starts[-1] + 1 : -1]))
        result = self.calculator(expression)
        if result is None:
            return []
        return [self.output_start, *self.tok.encode(result), self.output_end]
