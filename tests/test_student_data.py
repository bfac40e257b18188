"""From teacher records to student batches: the schema, images (EXIF, resize, flips), every node's
targets (real RLE masks, aligned soft labels), per-node masks for missing outputs, collate."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.flows.spec import load_spec
from student_support import CLASSES, DOCS, K, make_records, tiny_config, write_graph
from distillery.students.data import (TraceDataset, batch_to, build_schema, byte_tokenizer, collate, load_tokenizer)
from distillery.images import open_image


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    spec = load_spec(write_graph(tmp_path_factory.mktemp("graph")))
    records = make_records()
    schema = build_schema(spec, records)
    return spec, records, schema, load_tokenizer(schema)


def test_schema_describes_every_node_from_spec_and_records(graph):
    spec, _, schema, tok = graph
    det, rag, llm = schema.nodes["detector"], schema.nodes["retriever"], schema.nodes["reasoner"]
    assert (det["type"], det["task"], det["num_classes"], det["class_names"]) == ("yolo", "segment", 2, CLASSES)
    assert rag["doc_ids"] == [d["id"] for d in DOCS] and rag["top_k"] == 2  # the documents file's order
    assert llm["type"] == "llm" and schema.tokenizer == spec.teachers["reasoner"].model
    assert schema.text == {"vocab_size": len(tok), "pad_id": tok.pad_token_id, "eos_ids": [tok.eos_token_id]}
    assert list(schema.nodes)[-1] == "reasoner"  # topological order: the final answer last
    again = type(schema).from_dict(json.loads(json.dumps(schema.to_dict())))
    assert again == schema


def test_graph_without_llm_gets_a_byte_level_tokenizer(graph):
    spec, records, _, _ = graph
    spec = spec.model_copy(update={"teachers": {k: v for k, v in spec.teachers.items() if k != "reasoner"}})
    schema = build_schema(spec, records)
    tok = load_tokenizer(schema)
    assert schema.tokenizer is None and schema.text["vocab_size"] == len(tok) == 258
    ids = tok("Héllo, wörld?", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Héllo, wörld?" and len(ids) == len("Héllo, wörld?".encode())
    assert byte_tokenizer().eos_token_id in schema.text["eos_ids"]


def test_item_holds_image_question_and_every_target(graph):
    _, records, schema, tok = graph
    cfg = tiny_config()
    item = TraceDataset(records, schema, cfg, tok, train=False)[2]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
    assert tok.decode(item["question_ids"]) == records[2].question
    det = item["targets"]["detector"]["target"]
    out = records[2].outputs["detector"]
    torch.testing.assert_close(det["boxes"], torch.as_tensor(out["boxes"]))
    torch.testing.assert_close(det["probs"], torch.as_tensor(out["class_probs"]))
    assert det["masks"].shape == (2, 16, 16) and bool(det["has_masks"])
    for box, mask in zip(det["boxes"], det["masks"]):  # the RLE masks fill their boxes at proto size
        area = float((box[2] - box[0]) * (box[3] - box[1]) * 16 * 16)  # in proto pixels
        assert abs(mask.sum().item() / 255 - area) < 0.02 * 256
        x1, y1, x2, y2 = (box * 16).ceil().int().tolist()[:2] + (box * 16).floor().int().tolist()[2:]
        assert (mask[y1:y2, x1:x2] == 255).all()  # pixels fully inside the box are fully on
    rag = item["targets"]["retriever"]["target"]
    assert rag["doc_idx"].tolist() == [0, 2] and rag["scores"].dtype == torch.float32


def test_llm_targets_answer_and_rationale_with_aligned_soft_labels(graph):
    _, records, schema, tok = graph
    out = records[2].outputs["reasoner"]
    t = TraceDataset(records, schema, tiny_config(), tok)[2]["targets"]["reasoner"]["target"]
    assert t["rationale_ids"].tolist() == out["token_ids"].tolist()  # the teacher's whole generation
    assert t["answer_ids"].tolist() == tok("two", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert t["answer_kd_mask"].all() and t["rationale_kd_mask"].all()
    n = len(t["answer_ids"])  # soft labels of the answer = the teacher's rows for those tokens
    assert t["answer_topk_ids"].tolist() == out["topk_ids"][-n:].tolist()
    assert t["answer_topk_logprobs"].dtype == torch.float16 and t["answer_topk_logprobs"].shape == (n, K)


def test_answer_that_is_not_the_generation_tail_gets_hard_labels_only(graph):
    _, records, schema, tok = graph
    rec = copy.deepcopy(records[0])
    rec.outputs["reasoner"]["answer"] = "yes"  # e.g. a parse that differs from the tokens
    t = TraceDataset([rec], schema, tiny_config(), tok)[0]["targets"]["reasoner"]["target"]
    assert t["answer_ids"].tolist() == tok("yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert not t["answer_kd_mask"].any()


def test_missing_outputs_mask_only_their_node(graph):
    _, records, schema, tok = graph
    failed, truncated = copy.deepcopy(records[0]), copy.deepcopy(records[1])
    failed.status, failed.reason = "quarantined", "node_error:reasoner"
    failed.errors = {"reasoner": "prompt too long"}
    truncated.outputs["reasoner"]["truncated"] = True
    del truncated.outputs["retriever"]
    ds = TraceDataset([failed, truncated, records[2]], schema, tiny_config(), tok)
    batch = collate([ds[i] for i in range(3)])
    t = batch["targets"]
    assert t["reasoner"]["mask"].tolist() == [False, False, True]
    assert t["retriever"]["mask"].tolist() == [True, False, True]
    assert t["detector"]["mask"].tolist() == [True, True, True]


def test_collate_pads_every_node_and_batch_to_moves_tensors(graph):
    _, records, schema, tok = graph
    ds = TraceDataset(records, schema, tiny_config(), tok)
    batch = collate([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 64, 64) and batch["input_ids"] == [r.input_id for r in records]
    q = batch["question_mask"].sum(1).tolist()
    assert q == [len(tok(r.question, add_special_tokens=False)["input_ids"]) for r in records]
    det = batch["targets"]["detector"]
    assert det["boxes"].shape == (4, 2, 4)
    assert det["valid"].tolist() == [[True, False], [True, True], [True, True], [True, False]]
    assert det["masks"].shape == (4, 2, 16, 16) and det["probs"].shape == (4, 2, 2)
    llm = batch["targets"]["reasoner"]
    L = max(len(r.outputs["reasoner"]["token_ids"]) for r in records)
    assert llm["rationale_ids"].shape == (4, L) and llm["rationale_topk_logprobs"].shape == (4, L, K)
    moved = batch_to(batch, "meta")
    assert moved["targets"]["reasoner"]["answer_ids"].device.type == "meta"
    assert moved["input_ids"] == batch["input_ids"]


def test_a_record_without_soft_labels_does_not_cut_the_batch_top_k(graph):
    _, records, schema, tok = graph
    hard = copy.deepcopy(records[0])
    for key in ("topk_ids", "topk_logprobs"):  # e.g. a trace from a backend that stores no log-probs
        del hard.outputs["reasoner"][key]
    ds = TraceDataset([hard, records[2]], schema, tiny_config(), tok)
    soft = ds[1]["targets"]["reasoner"]["target"]
    llm = collate([ds[0], ds[1]])["targets"]["reasoner"]
    for key in ("answer", "rationale"):
        assert llm[f"{key}_topk_ids"].shape[-1] == K and llm[f"{key}_topk_logprobs"].shape[-1] == K
        assert not llm[f"{key}_kd_mask"][0].any()  # the hard-label record: padded, masked out
        assert (llm[f"{key}_topk_ids"][0] == 0).all() and (llm[f"{key}_topk_logprobs"][0] == 0).all()
        n = len(soft[f"{key}_ids"])  # the soft-label record keeps all its K columns
        assert torch.equal(llm[f"{key}_topk_ids"][1, :n], soft[f"{key}_topk_ids"])
        assert torch.equal(llm[f"{key}_topk_logprobs"][1, :n], soft[f"{key}_topk_logprobs"])
        assert torch.equal(llm[f"{key}_kd_mask"][1, :n], soft[f"{key}_kd_mask"])
    alone = collate([ds[0]])["targets"]["reasoner"]  # no soft labels anywhere: k = 1
    assert alone["answer_topk_ids"].shape[-1] == 1


def test_flips_are_deterministic_per_epoch_and_flip_the_targets(graph):
    _, records, schema, tok = graph
    ds = TraceDataset(records * 4, schema, tiny_config(hflip=0.5), tok)
    draws = {}
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        draws.setdefault(epoch, []).append([ds.flipped(i) for i in range(len(ds))])
    assert draws[0][0] == draws[0][1] and draws[0][0] != draws[1][0] and any(draws[0][0]) and not all(draws[0][0])
    ds.set_epoch(0)
    i = draws[0][0].index(True)
    item, plain = ds[i], TraceDataset(records * 4, schema, tiny_config(), tok)[i]
    assert torch.equal(item["image"], plain["image"].flip(-1))
    fb, pb = item["targets"]["detector"]["target"]["boxes"], plain["targets"]["detector"]["target"]["boxes"]
    torch.testing.assert_close(fb[:, [0, 2]], 1 - pb[:, [2, 0]])
    flipped_masks, masks = (x["targets"]["detector"]["target"]["masks"] for x in (item, plain))
    assert torch.equal(flipped_masks, masks.flip(-1))
    assert not TraceDataset(records, schema, tiny_config(hflip=1.0), tok, train=False).flipped(0)


def test_images_are_decoded_like_requests_exif_and_rgb():
    img = Image.new("L", (40, 20), 255)  # grey-scale, wide
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    decoded = open_image(buf.getvalue(), "request 0")
    assert decoded.size == (20, 40) and decoded.mode == "RGB"
    with pytest.raises(ValueError, match="record abc: cannot decode the image"):
        open_image(b"not an image", "record abc")
    assert np.asarray(decoded).shape == (40, 20, 3)


def test_decoded_items_are_kept_and_a_kept_item_flips_exactly_like_a_fresh_decode(graph):
    """Decoding is done once per record; a flipped epoch gives the bytes a flipped decode gives."""
    from distillery.images import open_image
    from distillery.students.data import image_tensor
    from distillery.students.model.heads.yolo import yolo_target

    _, records, schema, tok = graph
    cfg = tiny_config(hflip=1.0)
    ds = TraceDataset(records, schema, cfg, tok)
    first, again = ds[0], ds[0]
    rec = ds.records[0]
    fresh = image_tensor(open_image(rec.image_bytes, "r"), cfg.image_size, flip=True)
    assert torch.equal(first["image"], fresh) and torch.equal(again["image"], fresh)  # the kept item is not changed
    node = schema.nodes["detector"]
    want = yolo_target(rec.outputs["detector"], node, cfg.image_size // 4, flip=True)
    got = first["targets"]["detector"]["target"]
    for key in ("boxes", "masks", "probs"):
        assert torch.equal(got[key], want[key]), key
    assert len(ds._cache) == 1
