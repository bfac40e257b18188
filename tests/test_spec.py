"""Spec validation: errors name the node and the field, before any model loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distillery.flows.spec import Spec, SpecError, load_spec
from distillery.teachers.graph import dependencies, render_template

BASE = {
    "detector": {"type": "yolo", "weights": "yolo11n.yaml"},
    "retriever": {"type": "rag", "documents": "kb.jsonl", "query": "{request.question}"},
    "reasoner": {"type": "llm", "model": "m", "prompt": "{detector.summary} {retriever.context} {request.question}"},
}


def make(teachers: dict) -> Spec:
    return Spec.model_validate({"name": "t", "teachers": teachers})


def test_topological_order_follows_references():
    order = make(BASE).topological_order()
    assert order.index("reasoner") > order.index("detector")
    assert order.index("reasoner") > order.index("retriever")
    assert dependencies(make(BASE).teachers, "reasoner") == {"detector", "retriever"}


@pytest.mark.parametrize(
    "teachers, needle",
    [
        ({**BASE, "reasoner": {**BASE["reasoner"], "prompt": "{detektor.summary}"}},
         "teachers.reasoner.prompt: references unknown node 'detektor'"),
        ({**BASE, "reasoner": {**BASE["reasoner"], "prompt": "{detector.nope}"}},
         "teachers.reasoner.prompt: node 'detector' has no output field 'nope'"),
        ({**BASE, "retriever": {**BASE["retriever"], "query": "{request.answer}"}},
         "teachers.retriever.query: request has no field 'answer'"),
        ({**BASE, "retriever": {**BASE["retriever"], "query": "{request.__class__.x}"}},
         "teachers.retriever.query: bad reference"),
        ({"a": {"type": "rag", "documents": "d", "query": "{b.context}"},
          "b": {"type": "rag", "documents": "d", "query": "{a.context}"}}, "cycle between nodes"),
    ],
)
def test_graph_errors_name_node_and_field(teachers, needle):
    with pytest.raises(ValidationError) as e:
        make(teachers)
    assert needle in str(e.value)


def test_unknown_node_type_is_refused():
    with pytest.raises(ValidationError) as e:
        make({"x": {"type": "python_import", "target": "os.system"}})
    assert "x" in str(e.value) and "type" in str(e.value)


def test_unknown_field_is_refused():
    with pytest.raises(ValidationError) as e:
        make({"detector": {"type": "yolo", "weights": "w.pt", "wieghts": 1}})
    assert "wieghts" in str(e.value)


def test_render_template_is_plain_substitution():
    ctx = {"request": {"question": "how many?"}, "retriever": {"context": "a\nb", "ids": ["1", "2"]}}
    assert render_template("q={request.question} c={retriever.context}", ctx) == "q=how many? c=a\nb"
    assert render_template("{retriever.ids} {{literal}}", ctx) == "1\n2 {literal}"


def test_load_spec_resolves_relative_paths(tmp_path):
    (tmp_path / "kb.jsonl").write_text('{"id": "1", "text": "x"}\n')
    (tmp_path / "spec.yaml").write_text(
        "name: demo\nteachers:\n  retriever: {type: rag, documents: kb.jsonl}\n"
    )
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.teachers["retriever"].documents == str((tmp_path / "kb.jsonl").resolve())


def test_load_spec_rejects_unsafe_yaml(tmp_path):
    (tmp_path / "spec.yaml").write_text("name: !!python/object/apply:os.system ['echo hi']\nteachers: {}\n")
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "spec.yaml")
