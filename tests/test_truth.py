"""Ground truth from a user's own labelled inputs (students/evaluation/truth.py), through
pycocotools and a real trace store: a COCO annotations.json and labelled requests.jsonl lines
become teacher-shaped truth per record; bad label files are named by file and line / entry
before any model loads; the generic evaluation (``fidelity.evaluate_inputs``) on a tiny student.

The scenes are student_support's: coloured boxes whose teacher outputs are exact, so the
teacher's own outputs measured against the labels are perfect."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from distillery import rle
from distillery.students.evaluation.fidelity import evaluate_inputs, evaluate_predictions
from distillery.students.evaluation.truth import align, read_labels
from student_support import SCENES, make_records, tiny_config, write_graph

CATEGORIES = [{"id": 7, "name": "Blue  Box"}, {"id": 3, "name": "red box"}]  # ids and case differ from the detector's
CATEGORY = {"red box": 3, "blue box": 7}


def polygon(x1: int, y1: int, x2: int, y2: int) -> list[list[float]]:
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def segmentation(kind: str, w: int, h: int, box: tuple[int, int, int, int]):
    """One object's mask as ``kind``: the exact rectangle (rle), or its polygon as polygon,
    compressed RLE of that polygon (polygon-rle) or uncompressed RLE of it (uncompressed)."""
    x1, y1, x2, y2 = box
    if kind == "rle":
        m = np.zeros((h, w), np.uint8)
        m[y1:y2, x1:x2] = 1
        return rle.encode(m)
    if kind == "polygon":
        return polygon(*box)
    shape = rle.from_polygons(polygon(*box), h, w)
    if kind == "polygon-rle":
        return shape
    flat = rle.decode(shape).flatten(order="F")  # column-major runs, starting with zeros
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [h, w], "counts": np.diff(np.concatenate([[0], edges])).tolist()}


def write_inputs(root: Path, masks: str | None = "rle", coco: bool = True, lines: bool = True) -> list:
    """The scenes as a labelled inputs folder; returns their records, image paths in it."""
    records = make_records()
    (root / "images").mkdir(parents=True)
    requests, images, anns, out = [], [], [], []
    for i, ((w, h, objects, question, answer), rec) in enumerate(zip(SCENES, records)):
        name = f"images/{i}.png"
        (root / name).write_bytes(rec.image_bytes)
        line = {"image": name, "question": question}
        if lines:
            line |= {"answer": answer, "type": question.split()[0], "documents": ["doc-red" if "red" in question
                                                                                  else "doc-blue"]}
        requests.append(line)
        images.append({"id": 10 + i, "file_name": name, "width": w, "height": h})
        for cls, *box in objects:
            ann = {"id": len(anns) + 1, "image_id": 10 + i, "category_id": CATEGORY[cls],
                   "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0}
            anns.append(ann | ({"segmentation": segmentation(masks, w, h, tuple(box))} if masks else {}))
        out.append(replace(rec, image_path=str(root / name)))
    (root / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    if coco:
        (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                           "categories": CATEGORIES}))
    return out


@pytest.fixture
def graph(tmp_path):
    from distillery.flows.spec import load_spec

    return load_spec(write_graph(tmp_path / "graph"))


def test_truth_is_teacher_shaped_with_classes_matched_by_name(tmp_path, graph):
    records = write_inputs(tmp_path / "in")
    truth = align(read_labels(tmp_path / "in"), graph, records)
    for (w, h, objects, question, answer), rec, t, qtype in zip(SCENES, records, truth.outputs, truth.types):
        det = rec.outputs["detector"]
        assert t["detector"]["classes"] == det["classes"].tolist()  # "Blue  Box" (id 7) is the detector's 1
        np.testing.assert_allclose(t["detector"]["boxes"], det["boxes"], atol=1e-6)  # normalized xyxy
        assert t["detector"]["masks"] == det["masks"]
        assert t["reasoner"] == {"answer": answer} and qtype == question.split()[0]
        assert t["retriever"]["ids"] == ["doc-red" if "red" in question else "doc-blue"]
    assert truth.summary()["labelled"] == len(records) and truth.summary()["left_out"] == {}


def test_polygon_and_rle_masks_give_the_same_truth(tmp_path, graph):
    masks = {}
    for kind in ("polygon", "polygon-rle", "uncompressed"):
        records = write_inputs(tmp_path / kind, masks=kind)
        masks[kind] = [t["detector"]["masks"] for t in align(read_labels(tmp_path / kind), graph, records).outputs]
    assert masks["polygon"] == masks["polygon-rle"] == masks["uncompressed"]
    assert all(m["size"] == [h, w] for (w, h, *_), ms in zip(SCENES, masks["polygon"]) for m in ms)


def test_teacher_against_its_truth_is_perfect_and_retained_is_student_over_teacher(tmp_path, graph):
    records = write_inputs(tmp_path / "in")
    truth = align(read_labels(tmp_path / "in"), graph, records)
    student = [{**r.outputs, "reasoner": {"answer": "one"}} for r in records]  # right on 2 of the 4 answers
    report = evaluate_predictions(graph, records, student, truth.outputs, types=truth.types)
    teacher = report["teacher_vs_truth"]
    assert teacher["detector"] == {"map50": 1.0, "map50_95": 1.0, "mask_iou": 1.0, "n": 4}
    assert teacher["retriever"]["top1"] == 1.0 and teacher["reasoner"]["answer_em"] == 1.0
    assert report["student_vs_truth"]["reasoner"]["answer_em"] == 0.5
    assert report["retained"]["reasoner"]["answer_em"] == pytest.approx(0.5 / 1.0)
    assert report["retained"]["detector"]["map50"] == 1.0
    assert report["by_type"]["how"]["student_vs_truth"] == pytest.approx(2 / 3)
    # the two answers that differ are the student's mistakes: the truth sides with the teacher on both
    assert report["who_is_right"]["reasoner"] == {"n": 4, "differ": 2, "student_right": 0, "teacher_right": 2,
                                                  "both_wrong": 0, "agreement_where_teacher_right": 0.5}
    from distillery.students.evaluation.fidelity import report_rows

    assert {"node": "reasoner", "metric": "answer_em where the teacher is right",  # the table's (and artifact's) row
            "student_vs_teacher": 0.5} in report_rows(report)


def test_a_node_without_labels_has_no_truth_row(tmp_path, graph):
    records = write_inputs(tmp_path / "in", coco=False)
    lines = [json.loads(x) for x in (tmp_path / "in" / "requests.jsonl").read_text().splitlines()]
    (tmp_path / "in" / "requests.jsonl").write_text("".join(
        json.dumps({k: v for k, v in x.items() if k != "documents"}) + "\n" for x in lines))
    truth = align(read_labels(tmp_path / "in"), graph, records)
    report = evaluate_predictions(graph, records, [r.outputs for r in records], truth.outputs)
    assert set(report["student_vs_truth"]) == set(report["teacher_vs_truth"]) == {"reasoner"}
    assert set(report["retained"]) == {"reasoner"} and set(report["student_vs_teacher"]) == set(graph.teachers)


def test_boxes_only_labels_are_compared_on_boxes_not_masks(tmp_path, graph):
    records = write_inputs(tmp_path / "in", masks=None)
    truth = align(read_labels(tmp_path / "in"), graph, records)
    assert all("masks" not in t["detector"] for t in truth.outputs)
    report = evaluate_predictions(graph, records, [r.outputs for r in records], truth.outputs)
    assert report["teacher_vs_truth"]["detector"] == {"map50": 1.0, "map50_95": 1.0, "n": 4}


def test_unknown_categories_and_crowds_are_left_out_not_fatal(tmp_path, graph):
    records = write_inputs(tmp_path / "in")
    path = tmp_path / "in" / "annotations.json"
    coco = json.loads(path.read_text())
    coco["categories"].append({"id": 99, "name": "green box"})
    coco["annotations"] += [{"id": 500, "image_id": 10, "category_id": 99, "bbox": [1, 1, 5, 5], "segmentation": []},
                            {"id": 501, "image_id": 10, "category_id": 3, "bbox": [0, 0, 9, 9], "iscrowd": 1}]
    path.write_text(json.dumps(coco))
    truth = align(read_labels(tmp_path / "in"), graph, records)
    assert truth.outputs[0]["detector"]["labels"] == ["red box"]  # as before: the extra two are left out
    assert truth.summary()["left_out"] == {"detector": {"green box": 1, "(crowd)": 1}}


def test_records_of_a_moved_folder_match_on_their_input_id(tmp_path, graph):
    records = write_inputs(tmp_path / "in")
    coco = json.loads((tmp_path / "in" / "annotations.json").read_text())
    for im in coco["images"]:  # COCO's usual bare file names, the images one folder down
        im["file_name"] = Path(im["file_name"]).name
    (tmp_path / "in" / "annotations.json").write_text(json.dumps(coco))
    elsewhere = [replace(r, image_path=f"/recorded/elsewhere/{i}.png") for i, r in enumerate(records)]
    labels = read_labels(tmp_path / "in")
    truth = align(labels, graph, elsewhere)
    assert all(t is not None and len(t) == 3 for t in truth.outputs)
    assert labels.select(elsewhere[:3]) == (elsewhere[:3], labels.requests[3:])


BAD = {
    "not-json": ("annotations.json", "{'images': []", r"annotations.json: not valid JSON"),
    "no-width": ("annotations.json", {"images": [{"id": 1, "file_name": "a.png", "height": 4}]},
                 r"annotations.json images\[0\] \(id 1\): 'width' and 'height'"),
    "bad-bbox": ("annotations.json", {"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                                      "categories": [{"id": 1, "name": "x"}],
                                      "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 2]}]},
                 r"annotations.json annotations\[0\] \(id 5\): 'bbox'"),
    "unknown-image": ("annotations.json", {"images": [], "categories": [{"id": 1, "name": "x"}],
                                           "annotations": [{"id": 5, "image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1]}]},
                      r"annotations\[0\] \(id 5\): image_id 3"),
    "rle-size": ("annotations.json", {"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                                      "categories": [{"id": 1, "name": "x"}],
                                      "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1],
                                                       "segmentation": {"size": [2, 2], "counts": "abc"}}]},
                 r"annotations\[0\] \(id 5\): 'segmentation' must be polygons or an RLE"),
    "nameless-category": ("annotations.json", {"images": [], "categories": [{"id": 1}]},
                          r"categories\[0\] \(id 1\): .name. must be a non-empty string"),
    "answer-list": ("requests.jsonl", [{"image": "a.png", "question": "q"},
                                       {"image": "a.png", "question": "r", "answer": ["2"]}],
                    r"requests.jsonl line 2: 'answer' must be a string"),
    "type-number": ("requests.jsonl", [{"image": "a.png", "question": "q", "type": 3}],
                    r"requests.jsonl line 1: 'type' must be a non-empty string"),
    "documents-string": ("requests.jsonl", [{"image": "a.png", "question": "q", "documents": "doc-1"}],
                         r"requests.jsonl line 1: 'documents' must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_label_file_is_named_by_file_and_entry_before_any_model_loads(tmp_path, case):
    name, content, message = BAD[case]
    if isinstance(content, list):
        text = "".join(json.dumps(x) + "\n" for x in content)
    else:
        text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_labels(tmp_path)
    with pytest.raises(ValueError, match=message):  # not "no such student": the labels are read first
        evaluate_inputs(tmp_path / "no-student", tmp_path, str(tmp_path / "traces.lance"))


def test_labels_of_another_image_size_are_refused(tmp_path, graph):
    records = write_inputs(tmp_path / "in")
    path = tmp_path / "in" / "annotations.json"
    coco = json.loads(path.read_text())
    coco["images"][1]["width"] = 81
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 11]
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotations.json: image 'images/1.png' \(id 11\) is 81x80 in the labels"):
        align(read_labels(tmp_path / "in"), graph, records)


# ---------------------------------------------------------------------------------------------
# The generic evaluation: a student folder, a labelled inputs folder, the trace store
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def student(tmp_path, graph):
    """A tiny student (random weights) whose lineage names the records' teacher graph ("test")."""
    import torch

    from distillery.students.data import build_schema, load_tokenizer
    from distillery.students.model.student import MultimodalStudent

    schema = build_schema(graph, make_records())
    torch.manual_seed(0)
    model = MultimodalStudent(tiny_config(), schema)
    model.tokenizer = load_tokenizer(schema)
    folder = model.save_pretrained(tmp_path / "student")
    (folder / "lineage.json").write_text(json.dumps({"graph_fingerprint": "test"}))
    return folder


def test_evaluate_inputs_on_a_real_trace_store(tmp_path, student):
    from distillery.teachers.store import TraceStore

    records = write_inputs(tmp_path / "in")
    TraceStore(str(tmp_path / "traces.lance")).append(records)
    report = evaluate_inputs(student, tmp_path / "in", str(tmp_path / "traces.lance"))
    assert report["n_records"] == 4 and report["graph_fingerprint"] == "test"
    assert set(report["student_vs_truth"]) == {"detector", "retriever", "reasoner"}
    for node, metrics in report["retained"].items():
        for name, v in metrics.items():
            assert v == pytest.approx(report["student_vs_truth"][node][name] / report["teacher_vs_truth"][node][name])
    assert report["labels"]["labelled"] == 4 and report["labels"]["masks"] is True
    assert sum(row["n"] for row in report["by_type"].values()) == 4


def test_missing_traces_say_how_to_record_them(tmp_path, student):
    from distillery.teachers.store import TraceStore

    records = write_inputs(tmp_path / "in")
    TraceStore(str(tmp_path / "traces.lance")).append(records[:3])
    with pytest.raises(ValueError, match=r"1 of the 4 inputs .* line 4\) have no trace of teacher graph test; "
                                         r"record them first: distillery record SPEC --inputs"):
        evaluate_inputs(student, tmp_path / "in", str(tmp_path / "traces.lance"))
    with pytest.raises(ValueError, match="4 of the 4 inputs"):
        evaluate_inputs(student, tmp_path / "in", str(tmp_path / "none.lance"))
