"""The payload filter language, compiled to parameterised SQL over the items' JSONB payload.

A filter is a JSON object. Keys are payload fields (dotted paths reach nested objects) or the
combinators `and`, `or`, `not`:

    {"category": "news"}                         equality (also {"category": {"eq": "news"}})
    {"category": {"ne": "news"}}                 not equal (items without the field match too)
    {"tags": {"in": ["a", "b"]}}                 the field equals one of the values, or, for an
                                                 array field, contains one of them
    {"year": {"gte": 2000, "lt": 2010}}          range: gt, gte, lt, lte (numbers or strings)
    {"author": {"exists": true}}                 the field is present (false: absent)
    {"and": [f1, f2]}, {"or": [f1, f2]}, {"not": f}
    {"a": 1, "b": 2}                             several keys in one object are ANDed

Field names never reach the SQL text: paths are passed as text[] parameters (`payload #> %(f0)s`) and
values as JSONB parameters. Range comparisons only match values of the same JSON type, so a string
never compares with a number and no cast can fail at query time.

A filter is bounded in depth and in width (`FilterLimits`, serve.filter_limits in configs/stack.yaml):
comparisons, `in` values per list and in all, distinct fields. Without width bounds a few tens of
thousands of `in` values exceed Postgres' 65,535 parameters and a little less is an enormous scan.
"""

from __future__ import annotations

import json
import re
from typing import Any

from psycopg import sql

from es_ray.config import FILTER_MAX_PARAMETERS, FilterLimits

FIELD_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}(\.[A-Za-z_][A-Za-z0-9_-]{0,63}){0,7}$")
RANGE_OPERATORS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
OPERATORS = {"eq", "ne", "in", "exists", *RANGE_OPERATORS}
DEFAULT_LIMITS = FilterLimits()  # configs/stack.yaml's serve.filter_limits, as typed in es_ray/config.py


class FilterError(ValueError):
    """The filter is not valid; the message says where and why."""


class _Params(dict):
    """Named query parameters f0, f1, ...; `add` returns the placeholder for a new one. Also counts what
    the filter's size is bounded by, and refuses the part that goes over a limit."""

    def __init__(self, limits: FilterLimits | None):
        super().__init__()
        self.limits = limits
        self.leaves = self.values = 0
        self.fields: set[str] = set()

    def add(self, value: Any, cast: str) -> sql.Composable:
        if len(self) >= FILTER_MAX_PARAMETERS:
            raise FilterError(f"filter: needs more than {FILTER_MAX_PARAMETERS} query parameters (Postgres' limit)")
        name = f"f{len(self)}"
        self[name] = value
        return sql.SQL("{}::" + cast).format(sql.Placeholder(name))

    def count_field(self, field: str, where: str) -> None:
        self.fields.add(field)
        if self.limits and len(self.fields) > self.limits.max_fields:
            raise FilterError(f"{where}: the filter names more than {self.limits.max_fields} distinct fields "
                              "(limit serve.filter_limits.max_fields)")

    def count_leaf(self, where: str, in_values: int = 0) -> None:
        self.leaves += 1
        self.values += in_values
        if not self.limits:
            return
        if self.leaves > self.limits.max_leaves:
            raise FilterError(f"{where}: the filter holds more than {self.limits.max_leaves} comparisons "
                              "(limit serve.filter_limits.max_leaves)")
        if in_values > self.limits.max_in_values:
            raise FilterError(f"{where}.in: {in_values} values in one list; at most {self.limits.max_in_values} "
                              "(limit serve.filter_limits.max_in_values)")
        if self.values > self.limits.max_values:
            raise FilterError(f"{where}.in: the filter holds more than {self.limits.max_values} `in` values in all "
                              "(limit serve.filter_limits.max_values)")


def compile_filter(filter_: dict[str, Any] | None, column: str = "payload",
                   limits: FilterLimits | None = DEFAULT_LIMITS) -> tuple[sql.Composable, dict[str, Any]]:
    """Returns (SQL condition, named parameters). An empty or missing filter is TRUE.

    `limits`: the size a filter may have (the API validates requests with the stack's configured ones).
    None keeps only Postgres' parameter limit: the store compiles again a filter the API has accepted."""
    params = _Params(limits)
    if not filter_:
        return sql.SQL("TRUE"), {}
    condition = _compile_object(filter_, sql.Identifier(*column.split(".")), params, "filter", 0)
    return condition, dict(params)


def _compile_object(obj: Any, column: sql.Composable, params: _Params, where: str, depth: int) -> sql.Composable:
    max_depth = params.limits.max_depth if params.limits else None
    if max_depth is not None and depth > max_depth:
        raise FilterError(f"{where}: filter nested deeper than {max_depth} levels (limit serve.filter_limits.max_depth)")
    if not isinstance(obj, dict) or not obj:
        raise FilterError(f"{where}: expected a non-empty object, got {json.dumps(obj)[:80]}")
    parts = []
    for key, value in obj.items():
        here = f"{where}.{key}"
        if key in ("and", "or"):
            if not isinstance(value, list) or not value:
                raise FilterError(f"{here}: expected a non-empty list of filters")
            inner = [_compile_object(v, column, params, f"{here}[{i}]", depth + 1) for i, v in enumerate(value)]
            joiner = sql.SQL(" AND ") if key == "and" else sql.SQL(" OR ")
            parts.append(sql.SQL("({})").format(joiner.join(inner)))
        elif key == "not":
            parts.append(sql.SQL("(NOT {})").format(_compile_object(value, column, params, here, depth + 1)))
        else:
            parts.append(_compile_field(key, value, column, params, here))
    return parts[0] if len(parts) == 1 else sql.SQL("({})").format(sql.SQL(" AND ").join(parts))


def _compile_field(field: str, spec: Any, column: sql.Composable, params: _Params, where: str) -> sql.Composable:
    if not FIELD_PATTERN.match(field):
        raise FilterError(f"{where}: '{field[:80]}' is not a field name (letters, digits, _ and -, dots for nesting)"
                          " nor one of and/or/not")
    params.count_field(field, where)
    path = field.split(".")
    if not isinstance(spec, dict):
        params.count_leaf(where)
        return _equals(path, spec, column, params, where)
    if not spec:
        raise FilterError(f"{where}: empty operator object")
    unknown = sorted(set(spec) - OPERATORS)
    if unknown:
        raise FilterError(f"{where}: unknown operator '{unknown[0]}' (known: {', '.join(sorted(OPERATORS))})")
    parts = []
    for op, value in spec.items():
        if op != "in":
            params.count_leaf(f"{where}.{op}")
        if op == "eq":
            parts.append(_equals(path, value, column, params, f"{where}.eq"))
        elif op == "ne":
            parts.append(sql.SQL("(NOT {})").format(_equals(path, value, column, params, f"{where}.ne")))
        elif op == "in":
            if not isinstance(value, list) or not value:
                most = params.limits.max_in_values if params.limits else "any number of"
                raise FilterError(f"{where}.in: expected a list of 1 to {most} values")
            params.count_leaf(where, in_values=len(value))
            alternatives = [_equals(path, v, column, params, f"{where}.in") for v in value]
            parts.append(sql.SQL("({})").format(sql.SQL(" OR ").join(alternatives)))
        elif op == "exists":
            if not isinstance(value, bool):
                raise FilterError(f"{where}.exists: expected true or false")
            test = sql.SQL("({} #> {} IS NOT NULL)").format(column, params.add(path, "text[]"))
            parts.append(test if value else sql.SQL("(NOT {})").format(test))
        else:
            parts.append(_range(path, op, value, column, params, f"{where}.{op}"))
    return parts[0] if len(parts) == 1 else sql.SQL("({})").format(sql.SQL(" AND ").join(parts))


def _equals(path: list[str], value: Any, column: sql.Composable, params: _Params, where: str) -> sql.Composable:
    if isinstance(value, (dict, list)):
        raise FilterError(f"{where}: equality takes a string, number, boolean or null, not {type(value).__name__}")
    # Containment uses the GIN index: {"a": {"b": v}} for the value itself, {"a": {"b": [v]}} for an
    # array field holding v among its elements.
    def nest(leaf: Any) -> str:
        for key in reversed(path):
            leaf = {key: leaf}
        return json.dumps(leaf)

    return sql.SQL("({col} @> {scalar} OR {col} @> {array})").format(
        col=column, scalar=params.add(nest(value), "jsonb"), array=params.add(nest([value]), "jsonb"))


def _range(path: list[str], op: str, value: Any, column: sql.Composable, params: _Params, where: str) -> sql.Composable:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FilterError(f"{where}: range bounds must be numbers or strings")
    json_type = "string" if isinstance(value, str) else "number"
    field_path = params.add(path, "text[]")
    return sql.SQL("(jsonb_typeof({col} #> {path}) = {type} AND {col} #> {path} {op} {value})").format(
        col=column, path=field_path, type=params.add(json_type, "text"), op=sql.SQL(RANGE_OPERATORS[op]),
        value=params.add(json.dumps(value), "jsonb"))
