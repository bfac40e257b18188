"""The Prefect form's schema of a spec's teachers (``node_form_schema``): one group of fields per
node of the spec, each with its type's settings, while the mapping still takes any registered type.

Prefect's UI (3.8) draws an object's ``properties`` as fields and a bare mapping (only
``additionalProperties``) as one JSON editor; tests/browser/test_ui_prefect.py sees the fields in
the browser."""

from __future__ import annotations

import jsonschema
from distillery.flows.spec import TEACHERS_EXAMPLE, Spec
from distillery.teachers.base import node_form_schema

SPEC = {"name": "form", "teachers": TEACHERS_EXAMPLE}


def _teachers_schema() -> tuple[dict, dict]:
    full = Spec.model_json_schema()
    return full, full["properties"]["teachers"]


def test_each_node_of_the_spec_is_a_group_of_its_types_fields():
    spec = Spec.model_validate(SPEC)
    _, teachers = _teachers_schema()
    assert "properties" not in teachers  # the class's schema: one JSON editor in the form
    form = node_form_schema(teachers, spec.teachers)
    assert list(form["properties"]) == ["detector", "retriever", "reasoner"]
    rag = form["properties"]["retriever"]
    assert rag["properties"]["type"]["const"] == "rag"
    assert {"top_k", "query", "documents"} <= set(rag["properties"])
    assert {"prompt", "logprobs_k"} <= set(form["properties"]["reasoner"]["properties"])
    assert form["properties"]["detector"]["description"].startswith("`yolo` node.")
    assert form["additionalProperties"] == teachers["additionalProperties"]  # a node added later validates
    assert "properties" not in teachers  # the class's schema is left as it was


def test_the_form_schema_accepts_the_spec_it_was_made_for_and_refuses_a_wrong_field():
    spec = Spec.model_validate(SPEC)
    full, teachers = _teachers_schema()
    schema = {**full, "properties": {**full["properties"], "teachers": node_form_schema(teachers, spec.teachers)}}
    value = spec.model_dump(mode="json")
    jsonschema.validate(value, schema)
    value["teachers"]["retriever"]["top_k"] = "four"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        assert list(e.absolute_path)[:3] == ["teachers", "retriever", "top_k"]
    else:
        raise AssertionError("a string top_k passed the form's schema")


def test_a_type_the_schema_does_not_offer_keeps_the_json_editor():
    spec = Spec.model_validate(SPEC)
    _, teachers = _teachers_schema()
    only_rag = {**teachers, "additionalProperties": {
        "oneOf": [v for v in teachers["additionalProperties"]["oneOf"] if v["properties"]["type"].get("const") == "rag"]}}
    assert "properties" not in node_form_schema(only_rag, spec.teachers)
