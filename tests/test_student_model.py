"""The multimodal student on tiny hand-built traces: one forward pass gives every head's outputs;
it overfits four examples (boxes, masks, documents, answers); a node missing for one input adds
no loss for it; gradients reach every head; save/load round trip; the predictor's inputs."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from distillery.flows.spec import load_spec
from student_support import make_records, tiny_config, write_graph
from distillery.students.data import TraceDataset, build_schema, byte_tokenizer, collate, load_tokenizer
from distillery.students.model.heads import head_class
from distillery.students.model.student import MultimodalStudent
from distillery.students.serving.predictor import StudentPredictor

STEPS = 80


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    spec = load_spec(write_graph(tmp_path_factory.mktemp("graph")))
    records = make_records()
    schema = build_schema(spec, records)
    tok = load_tokenizer(schema)
    batch = collate([i for i in TraceDataset(records, schema, tiny_config(), tok)])
    return {"spec": spec, "records": records, "schema": schema, "tok": tok, "batch": batch}


def new_model(setup, **kw) -> MultimodalStudent:
    torch.manual_seed(0)
    return MultimodalStudent(tiny_config(**kw), setup["schema"])


@pytest.fixture(scope="module")
def trained(setup):
    """The tiny student overfitted on the four records; returns (model, loss history)."""
    model = new_model(setup)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    history = []
    for _ in range(STEPS):
        total, per_node = model.loss(setup["batch"])
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in per_node.items()}})
    return model.eval(), history


def test_one_forward_pass_gives_every_head_its_outputs(setup):
    model = new_model(setup)
    out = model(setup["batch"])
    V, P = setup["schema"].vocab_size, (64 // 8) ** 2
    det, rag, llm = out["detector"], out["retriever"], out["reasoner"]
    assert det["cls"].shape == (4, P, 2) and det["boxes"].shape == (4, P, 4)
    assert det["coef"].shape == (4, P, 8) and det["protos"].shape == (4, 8, 16, 16)
    assert rag["logits"].shape == (4, 3)
    target = setup["batch"]["targets"]["reasoner"]
    La, Lr = target["answer_ids"].shape[1], target["rationale_ids"].shape[1]
    assert llm["answer_logits"].shape == (4, La, V) and llm["rationale_logits"].shape == (4, Lr, V)
    total, per_node = model.loss(setup["batch"], out)
    assert torch.isfinite(total) and set(per_node) == {"detector", "retriever", "reasoner"}
    assert not any(v.requires_grad for v in per_node.values())


def test_answer_task_sees_at_inference_exactly_what_it_saw_in_training(setup):
    """Segments never see each other: with the rationale and retrieval segments in the sequence
    (training) or not (inference), and through the key/value cache, [answer] gets the same logits."""
    model = new_model(setup, detection_summary=False).eval()  # (summary: the teacher's vs its own)
    batch = setup["batch"]
    train_logits = model(batch)["reasoner"]["answer_logits"]  # (B, La, V), teacher forcing
    infer = {k: batch[k] for k in ("images", "question_ids", "question_mask")}
    _, feats, state = model.encode(infer)
    torch.testing.assert_close(model.decoder.lm_head(feats.text["reasoner/answer"][:, 0]), train_logits[:, 0])
    first = batch["targets"]["reasoner"]["answer_ids"][:, 0]  # (B,)
    index = [s.name for s in state["segments"]].index("reasoner/answer") + 1
    x = (model.decoder.tok_embed(first) + model.decoder.text_pos(state["n_q"] + 1))[:, None]  # (B, 1, d)
    B = x.shape[0]
    hid, _ = model.decoder.run(x, torch.full((B, 1), index), torch.ones(B, 1, dtype=torch.bool), past=state["cache"])
    torch.testing.assert_close(model.decoder.lm_head(hid[:, 0]), train_logits[:, 1])


def test_gradients_reach_every_head_in_one_backward(setup):
    model = new_model(setup)
    total, _ = model.loss(setup["batch"])
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    for name, head in model.heads.items():
        assert sum(p.grad.abs().sum() for p in head.parameters()) > 0, name
    assert model.vision.stem[0].weight.grad.abs().sum() > 0 and model.decoder.tok_embed.weight.grad.abs().sum() > 0


def test_overfits_four_examples(setup, trained):
    model, history = trained
    for node in ("total", "detector", "retriever", "reasoner"):
        first, last = np.mean([h[node] for h in history[:3]]), np.mean([h[node] for h in history[-3:]])
        assert np.isfinite(last) and last < 0.5 * first, node
    preds = StudentPredictor.from_model(model).predict(
        [{"image": r.image_bytes, "question": r.question} for r in setup["records"]])
    for pred, rec in zip(preds, setup["records"]):
        teacher = rec.outputs
        assert pred["answer"] == pred["reasoner"]["answer"] == teacher["reasoner"]["answer"]
        assert pred["retriever"]["ids"][0] == teacher["retriever"]["ids"][0]
        det = pred["detector"]
        iou = box_iou(torch.tensor(det["boxes"]).view(-1, 4), torch.as_tensor(teacher["detector"]["boxes"]))  # (n, N)
        assert (iou.max(0).values > 0.5).all(), (det["boxes"], teacher["detector"]["boxes"])
        best = iou.argmax(0).tolist()
        assert [det["classes"][j] for j in best] == teacher["detector"]["classes"].tolist()
        h, w = teacher["detector"]["image_size"]
        for j, rle in zip(best, teacher["detector"]["masks"]):
            assert det["masks"][j]["size"] == [h, w]  # masks at the original image size
            m_iou = mask_utils.iou([_coco(det["masks"][j])], [_coco(rle)], [0])[0, 0]
            assert m_iou > 0.5


def test_detection_summary_is_the_teachers_in_training_and_the_heads_own_at_inference(setup, trained):
    model, _ = trained
    head, batch, tok = model.heads["detector"], setup["batch"], setup["tok"]
    out = model(batch)["detector"]
    teacher = [[sum(c == k for c in r.outputs["detector"]["classes"].tolist()) for k in range(2)]
               for r in setup["records"]]
    assert head.counts(out, batch["targets"]["detector"]).tolist() == teacher
    assert head.counts(out, None).tolist() == teacher  # after overfitting, its own detections agree
    assert head.counts(out | {"cls": torch.full_like(out["cls"], -9.0)}, None).sum() == 0
    target = batch["targets"]["detector"]
    large = [[sum(c == k and a >= head.large_area for c, a in zip(r.outputs["detector"]["classes"].tolist(),
                                                                 r.outputs["detector"]["areas"])) for k in range(2)]
             for r in setup["records"]]
    assert head.large_counts(out, target).tolist() == large and sum(map(sum, large)) > 0  # the masks' areas
    ids, valid = head.summary_ids(head.counts(out, target), tok, head.large_counts(out, target))  # 'text': (B, L)
    summaries = [tok.decode(i[v]) for i, v in zip(ids, valid)]
    assert summaries == [r.outputs["detector"]["summary"] for r in setup["records"]]  # the teacher's words
    assert summaries[2] == "red box x2 (1 large)"  # one of them covers more than LARGE_AREA of the image
    # 'slots' (the default): one token per class at a fixed place, which only its count changes
    emb, valid = head.prefix_embeds(out, batch["targets"]["detector"], tok, model.decoder.tok_embed)
    assert emb.shape == (len(teacher), 4, model.cfg.d_model) and valid.all()  # count slots, then large slots
    torch.testing.assert_close(emb[0, 0], emb[1, 0])  # one red box in both scenes
    assert not torch.allclose(emb[0, 0], emb[2, 0])  # one red box vs two
    torch.testing.assert_close(emb[0, 1], emb[2, 1])  # no blue box in either


def _coco(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode()}


def test_a_node_missing_for_one_input_adds_no_loss_for_it(setup):
    records = [r for r in setup["records"]]
    failed = make_records()[0]
    failed.status, failed.reason, failed.errors = "quarantined", "node_error:reasoner", {"reasoner": "boom"}
    ds = lambda recs: TraceDataset(recs, setup["schema"], tiny_config(), setup["tok"])  # noqa: E731
    model = new_model(setup).eval()  # eval: batch norm uses running stats, inputs do not interact
    with_failed = collate([ds([failed] + records[1:])[i] for i in range(4)])
    without = collate([ds(records[1:])[i] for i in range(3)])
    _, a = model.loss(with_failed)
    _, b = model.loss(without)
    torch.testing.assert_close(a["reasoner"], b["reasoner"])
    failed.outputs["reasoner"]["answer"] = "three"  # whatever the failed node left behind is ignored
    _, c = model.loss(collate([ds([failed] + records[1:])[i] for i in range(4)]))
    torch.testing.assert_close(c["reasoner"], a["reasoner"])
    assert not torch.isclose(a["detector"], b["detector"])  # the input still trains the other nodes


def test_mixed_precision_forward_and_loss(setup):
    """bf16 autocast (CPU here; the trainer uses it on CUDA): outputs in bf16, losses finite."""
    model = new_model(setup)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(setup["batch"])
        total, _ = model.loss(setup["batch"], out)
    assert out["reasoner"]["answer_logits"].dtype == torch.bfloat16
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_weights_and_auto_balance(setup):
    model = new_model(setup, loss_weights={"detector": 2.0, "retriever": 0.0})
    total, per = model.loss(setup["batch"])
    torch.testing.assert_close(total, 2 * per["detector"] + per["reasoner"])
    balanced = new_model(setup, auto_balance=True)
    total, per = balanced.loss(setup["batch"])  # first step: each node divided by its own magnitude
    torch.testing.assert_close(total, torch.tensor(3.0))
    assert balanced.balancer.running.tolist() == pytest.approx([per[n].item() for n in balanced.balancer.names])


def test_save_and_load_round_trip(setup, trained, tmp_path):
    model, _ = trained
    out = model.save_pretrained(tmp_path / "student")
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".bin", ".pickle"))]
    assert files <= {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja"}
    loaded = MultimodalStudent.from_pretrained(out)
    batch = {k: setup["batch"][k] for k in ("images", "question_ids", "question_mask")}
    a, b = model.predict_raw(batch), loaded.predict_raw(batch)
    for node in a:
        for key in a[node]:
            if isinstance(a[node][key], torch.Tensor):
                torch.testing.assert_close(a[node][key], b[node][key], rtol=0, atol=0)
            else:
                assert a[node][key] == b[node][key]
    assert loaded.tokenizer.get_vocab() == setup["tok"].get_vocab()
    with pytest.raises(FileNotFoundError, match="not a saved student"):
        MultimodalStudent.from_pretrained(tmp_path)


def test_predictor_accepts_path_bytes_and_base64_and_returns_json(setup, trained, tmp_path):
    model, _ = trained
    folder = model.save_pretrained(tmp_path / "student")
    predictor = StudentPredictor.load(folder)
    rec = setup["records"][1]
    path = tmp_path / "scene.png"
    path.write_bytes(rec.image_bytes)
    b64 = base64.b64encode(rec.image_bytes).decode()
    images = [str(path), rec.image_bytes, b64, "data:image/png;base64," + b64]
    requests = [{"image": image, "question": rec.question} for image in images]
    out = predictor.predict(requests)
    assert json.loads(json.dumps(out)) == out  # JSON-serializable as is
    assert all(o == out[0] for o in out)
    assert set(out[0]) == {"detector", "retriever", "reasoner", "answer"}
    assert {"boxes", "classes", "scores", "labels", "masks"} <= set(out[0]["detector"])
    assert out[0]["answer"] == rec.outputs["reasoner"]["answer"]
    default = predictor.predict([{"image": rec.image_bytes}])[0]  # the spec's default question
    asked = predictor.predict([{"image": rec.image_bytes, "question": setup["spec"].inputs.default_question}])[0]
    assert default == asked
    with pytest.raises(ValueError, match="request 1: 'image' is neither an existing file nor valid base64"):
        predictor.predict([requests[0], {"image": "no-such-file.png", "question": "q"}])
    with pytest.raises(ValueError, match="request 0: cannot decode the image"):
        predictor.predict([{"image": b"GIF89a-not-really", "question": "q"}])


def test_greedy_answers_never_exceed_max_answer_tokens(setup, monkeypatch):
    model = new_model(setup, max_answer_tokens=3).eval()  # untrained: no reason to emit eos early
    batch = {k: setup["batch"][k] for k in ("images", "question_ids", "question_mask")}
    assert all(len(ids) <= 3 for ids in model.predict_raw(batch)["reasoner"]["answer_ids"])
    eos = torch.tensor(setup["schema"].text["eos_ids"])
    lm_head = model.decoder.lm_head  # never eos: only the length limit can stop a row
    monkeypatch.setattr(model.decoder, "lm_head", lambda h: lm_head(h).index_fill(-1, eos, -torch.inf))
    for asked in (None, 50):  # a larger max_new_tokens does not lift the config's limit
        rows = model.predict_raw(batch, max_new_tokens=asked)["reasoner"]["answer_ids"]
        assert len(rows) == 4 and all(len(ids) == 3 for ids in rows)


def test_predictor_cuts_the_answer_at_the_llm_nodes_stop_string(setup):
    spec = setup["spec"]
    reasoner = spec.teachers["reasoner"].model_copy(update={"stop": ["."]})
    spec = spec.model_copy(update={"teachers": spec.teachers | {"reasoner": reasoner}})
    node = build_schema(spec, setup["records"]).nodes["reasoner"]
    assert node["stop"] == ["."]
    tok = byte_tokenizer()  # spells "." (the tests' word-level vocabulary has no such word)
    predictor = StudentPredictor(new_model(setup), tok)
    ids = tok("two. more", add_special_tokens=False)["input_ids"]
    assert predictor.decode_answer(ids, node) == "two"
    assert predictor.decode_answer(ids, setup["schema"].nodes["reasoner"]) == "two. more"  # no stop: kept


def test_unknown_node_type_has_no_head():
    with pytest.raises(KeyError, match=r"whisper.*known: llm, (openai, )?rag, yolo"):
        head_class("whisper")
