"""Hypothesis strategies for the JSON Schema subset FastAPI emits in an OpenAPI document ($ref, oneOf/anyOf,
const/enum, string/integer/number/boolean/null, arrays with items or prefixItems, objects with properties,
required and additionalProperties). Small on purpose: (hypothesis-jsonschema does not work with current
Hypothesis internals). Strings mix a few words that make valid facts with arbitrary text."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

WORDS = st.sampled_from(["{} is located in", "Place 1", "Place 2", "Town 3", "The capital of {} is", "Paris", "{}", ""])
LEAF = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)


def from_schema(schema: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy:
    """Values valid for ``schema`` (with ``#/components/schemas/...`` refs resolved in ``components``)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(components["schemas"][name], components))
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return st.one_of([from_schema(s, components) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 60), 60)
        return (WORDS | st.text(max_size=hi)).filter(lambda s: lo <= len(s) <= schema.get("maxLength", 10**9))
    if kind == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -10**6 - 1) + 1)
        return st.integers(lo, min(schema.get("maximum", 10**6), max(lo, 10**6)))
    if kind == "number":
        lo, hi = schema.get("minimum", schema.get("exclusiveMinimum", -1e6)), schema.get("maximum", 1e6)
        return st.floats(lo, hi, allow_nan=False, exclude_min="exclusiveMinimum" in schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        if "prefixItems" in schema:
            return st.tuples(*(from_schema(s, components) for s in schema["prefixItems"])).map(list)
        return st.lists(from_schema(schema.get("items", {}), components), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = {k: from_schema(v, components) for k, v in props.items() if k in required}
        optional = {k: from_schema(v, components) for k, v in props.items() if k not in required}
        base = st.fixed_dictionaries(fixed, optional=optional)
        if schema.get("additionalProperties") is True:
            base = st.tuples(base, st.dictionaries(st.text(max_size=8), LEAF, max_size=3)).map(lambda t: {**t[1], **t[0]})
        return base
    return JSON
