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


def test_personal_hits_merge_into_the_stream_without_reordering_it():
    # The relaxed index scan's stream is sorted per block, not as a whole: merged() keeps its order, so a
    # page computed from a longer stream starts with the page computed from a shorter one.
    from es_ray.store.search import SearchHit, merged

    stream = [SearchHit(i, s, {}) for i, s in (("a", 0.9), ("b", 0.7), ("c", 0.8), ("d", 0.6))]
    personal = [SearchHit("p", 0.75, {}), SearchHit("q", 0.95, {})]
    order = [h.id for h in merged(stream, personal)]
    assert order == ["q", "a", "p", "b", "c", "d"]
    shorter = [h.id for h in merged(stream[:2], personal)][:3]
    assert order[:3] == shorter
