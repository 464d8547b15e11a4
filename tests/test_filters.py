"""The filter language: compile errors name the problem; the SQL holds no user text."""

import pytest

from es_ray.store.filters import FilterError, compile_filter


def sql_text(filter_):
    condition, params = compile_filter(filter_)
    return condition.as_string(None), params


def test_empty_filter_is_true():
    assert sql_text(None)[0] == "TRUE"
    assert sql_text({})[0] == "TRUE"


def test_values_and_field_names_are_parameters_never_sql_text():
    text, params = sql_text({"title": "x'); DROP TABLE items_v1; --"})
    assert "DROP" not in text
    assert any("DROP TABLE" in str(v) for v in params.values())
    text, params = sql_text({"year": {"gte": 1990, "lt": 2000}, "meta.lang": {"eq": "en"}})
    assert "1990" not in text and "lang" not in text and "year" not in text
    assert ["year"] in params.values()
    assert '{"meta": {"lang": "en"}}' in params.values()


@pytest.mark.parametrize("bad, message", [
    ({"a": {"regex": "x"}}, "unknown operator 'regex'"),
    ({"a b": 1}, "not a field name"),
    ({"x'--": 1}, "not a field name"),
    ({"and": {}}, "expected a non-empty list"),
    ({"or": []}, "expected a non-empty list"),
    ({"not": []}, "expected a non-empty object"),
    ({"a": {"in": []}}, "expected a list of 1 to"),
    ({"a": {"in": "x"}}, "expected a list of 1 to"),
    ({"a": {"exists": "yes"}}, "expected true or false"),
    ({"a": {"gt": [1]}}, "range bounds must be numbers or strings"),
    ({"a": {"gt": True}}, "range bounds must be numbers or strings"),
    ({"a": {"eq": {"b": 1}}}, "equality takes a string"),
    ({"a": {}}, "empty operator object"),
])
def test_bad_filters_say_what_is_wrong(bad, message):
    with pytest.raises(FilterError, match=message):
        compile_filter(bad)


def test_deep_nesting_is_refused():
    deep = {"a": 1}
    for _ in range(40):
        deep = {"not": deep}
    with pytest.raises(FilterError, match="nested deeper"):
        compile_filter(deep)
