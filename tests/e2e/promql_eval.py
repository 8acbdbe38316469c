"""A small PromQL evaluator for the alert rules' tests (promtool is not available here).

Parses with promql-parser (the Rust parser Prometheus-compatible tools use) and evaluates the subset the
rules use, with Prometheus' semantics where they matter: instant selectors look back 5 minutes;
increase/rate/changes/deriv/delta over range selectors (increase handles counter resets, without
Prometheus' extrapolation to the window's edges); sum/max/min/count/avg by/without; arithmetic;
comparisons filter (or return 0/1 with bool); and/or/unless with on()/ignoring(); time().
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import promql_parser as pp

LOOKBACK_S = 300.0
Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]
Matrix = dict[Labels, list[tuple[float, float]]]


@dataclass
class Series:
    labels: dict[str, str]
    samples: list[tuple[float, float]]


def series(name: str, labels: dict[str, str], points: Iterable[tuple[float, float]]) -> Series:
    return Series({"__name__": name, **labels}, sorted(points))


def sample_every(start: float, end: float, step: float, value: Callable[[float], float]) -> list[tuple[float, float]]:
    out, t = [], start
    while t <= end:
        out.append((t, value(t)))
        t += step
    return out


def _drop_name(labels: Labels) -> Labels:
    return frozenset((k, v) for k, v in labels if k != "__name__")


def _matches(labels: dict[str, str], matcher: Any) -> bool:
    value = labels.get(matcher.name, "")
    op = str(matcher.op)
    if op.endswith("NotEqual"):
        return value != matcher.value
    if op.endswith("Equal"):
        return value == matcher.value
    if op.endswith("NotRe"):
        return re.fullmatch(matcher.value, value) is None
    if op.endswith("Re"):
        return re.fullmatch(matcher.value, value) is not None
    raise NotImplementedError(op)


class Evaluator:
    def __init__(self, data: list[Series]) -> None:
        self.data = data

    def query(self, expr: str, t: float) -> Vector | float:
        return self._eval(pp.parse(expr), t)

    def _select(self, node: Any) -> list[Series]:
        out = []
        for s in self.data:
            if node.name and s.labels["__name__"] != node.name:
                continue
            if all(_matches(s.labels, m) for m in node.matchers.matchers):
                out.append(s)
        return out

    def _eval(self, node: Any, t: float) -> Any:
        kind = type(node).__name__
        if kind == "NumberLiteral":
            return float(node.val)
        if kind == "ParenExpr":
            return self._eval(node.expr, t)
        if kind == "UnaryExpr":
            v = self._eval(node.expr, t)
            return -v if isinstance(v, float) else {_drop_name(k): -x for k, x in v.items()}
        if kind == "VectorSelector":
            vec: Vector = {}
            for s in self._select(node):
                recent = [v for ts, v in s.samples if t - LOOKBACK_S < ts <= t]
                if recent:
                    vec[frozenset(s.labels.items())] = recent[-1]
            return vec
        if kind == "MatrixSelector":
            window = node.range.total_seconds()
            mat: Matrix = {}
            for s in self._select(node.vector_selector):
                pts = [(ts, v) for ts, v in s.samples if t - window < ts <= t]
                if pts:
                    mat[frozenset(s.labels.items())] = pts
            return mat
        if kind == "Call":
            return self._call(node, t)
        if kind == "AggregateExpr":
            return self._aggregate(node, t)
        if kind == "BinaryExpr":
            return self._binary(node, t)
        raise NotImplementedError(kind)

    def _call(self, node: Any, t: float) -> Any:
        name = node.func.name
        if name == "time":
            return float(t)
        mat: Matrix = self._eval(node.args[0], t)
        out: Vector = {}
        for labels, pts in mat.items():
            values = [v for _, v in pts]
            key = _drop_name(labels)
            if name == "changes":
                out[key] = float(sum(1 for a, b in pairwise(values) if a != b))
                continue
            if len(pts) < 2:
                continue
            if name in ("increase", "rate"):
                inc = sum((b - a) if b >= a else b for a, b in pairwise(values))
                out[key] = inc if name == "increase" else inc / (pts[-1][0] - pts[0][0])
            elif name == "delta":
                out[key] = values[-1] - values[0]
            elif name == "deriv":
                n = len(pts)
                mt = sum(ts for ts, _ in pts) / n
                mv = sum(values) / n
                den = sum((ts - mt) ** 2 for ts, _ in pts)
                out[key] = sum((ts - mt) * (v - mv) for ts, v in pts) / den
            else:
                raise NotImplementedError(name)
        return out

    def _aggregate(self, node: Any, t: float) -> Vector:
        vec: Vector = self._eval(node.expr, t)
        mod = node.modifier
        groups: dict[Labels, list[float]] = {}
        for labels, v in vec.items():
            d = dict(labels)
            if mod is None:
                key: Labels = frozenset()
            elif str(mod.type).endswith("By"):
                key = frozenset((k, d[k]) for k in mod.labels if k in d)
            else:
                key = frozenset((k, x) for k, x in d.items() if k not in mod.labels and k != "__name__")
            groups.setdefault(key, []).append(v)
        op = str(node.op)
        fn: dict[str, Callable[[list[float]], float]] = {
            "sum": sum, "max": max, "min": min, "count": lambda xs: float(len(xs)), "avg": lambda xs: sum(xs) / len(xs),
        }
        return {k: float(fn[op](vs)) for k, vs in groups.items()}

    def _binary(self, node: Any, t: float) -> Any:
        op = str(node.op)
        lhs, rhs = self._eval(node.lhs, t), self._eval(node.rhs, t)
        mod = node.modifier
        return_bool = bool(mod and mod.return_bool)
        arith: dict[str, Callable[[float, float], float]] = {
            "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
            "/": lambda a, b: a / b if b else float("nan"),
        }
        comp: dict[str, Callable[[float, float], bool]] = {
            ">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b,
            "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
        }
        if isinstance(lhs, float) and isinstance(rhs, float):
            return arith[op](lhs, rhs) if op in arith else float(comp[op](lhs, rhs))
        if isinstance(lhs, float) or isinstance(rhs, float):
            vec, scalar, vec_left = (rhs, lhs, False) if isinstance(lhs, float) else (lhs, rhs, True)
            out: Vector = {}
            for labels, v in vec.items():
                a, b = (v, scalar) if vec_left else (scalar, v)
                if op in arith:
                    out[_drop_name(labels)] = arith[op](a, b)
                elif return_bool:
                    out[_drop_name(labels)] = float(comp[op](a, b))
                elif comp[op](a, b):
                    out[labels] = v
            return out

        def sig(labels: Labels) -> Labels:
            m = mod.matching if mod is not None else None
            if m is None:
                return _drop_name(labels)
            if str(m.type).endswith("Include"):
                return frozenset((k, v) for k, v in labels if k in m.labels)
            return frozenset((k, v) for k, v in labels if k not in m.labels and k != "__name__")

        rsigs = {sig(k): v for k, v in rhs.items()}
        if op == "and":
            return {k: v for k, v in lhs.items() if sig(k) in rsigs}
        if op == "unless":
            return {k: v for k, v in lhs.items() if sig(k) not in rsigs}
        if op == "or":
            lsigs = {sig(k) for k in lhs}
            return {**lhs, **{k: v for k, v in rhs.items() if sig(k) not in lsigs}}
        out = {}
        for labels, a in lhs.items():
            s = sig(labels)
            if s not in rsigs:
                continue
            b = rsigs[s]
            if op in arith:
                out[_drop_name(labels)] = arith[op](a, b)
            elif return_bool:
                out[_drop_name(labels)] = float(comp[op](a, b))
            elif comp[op](a, b):
                out[labels] = a
        return out


def selector_names(expr: str) -> set[str]:
    """Every metric name a rule's expression reads."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            names.add(node.name)
        elif kind == "MatrixSelector":
            walk(node.vector_selector)
        for attr in ("expr", "lhs", "rhs"):
            if hasattr(node, attr) and kind not in ("VectorSelector", "MatrixSelector"):
                walk(getattr(node, attr))
        if kind == "Call":
            for a in node.args:
                walk(a)

    walk(pp.parse(expr))
    return names
