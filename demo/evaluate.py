"""How good the demo teachers are, on a split of the world they were trained on.

* YOLO: Ultralytics' own validation (box and mask mAP50) on the split.
* Retriever: recall of the documents each question needs, in the top-k of the real retriever.
* LLM: answer accuracy (greedy decoding) with prompts built from ground-truth detections, and
  from the YOLO teacher's detections (per question type too: the ``large`` questions show what
  the masks are worth); the retrieved context is the real retriever's top-k.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from distillery.demo import kb
from distillery.demo import retrieval
from distillery.demo.llm_teacher import generate, load_llm
from distillery.demo.world import World


def yolo_metrics(weights: Path, world: World, split: str, imgsz: int) -> dict[str, float]:
    """Box and mask mAP50 (and mAP50-95) from ``YOLO.val`` on ``split``."""
    from distillery import runtime

    runtime.configure(offline=True)
    from ultralytics import YOLO

    runtime.quiet_ultralytics()
    with tempfile.TemporaryDirectory() as tmp:
        m = YOLO(str(weights)).val(data=str(world.data_yaml), split=split, imgsz=imgsz, batch=16,
                                   device="cpu", plots=False, project=tmp, name="val", workers=0,
                                   verbose=False)
    return {"box_map50": round(float(m.box.map50), 4), "mask_map50": round(float(m.seg.map50), 4),
            "box_map50_95": round(float(m.box.map), 4), "mask_map50_95": round(float(m.seg.map), 4)}


def yolo_detections(weights: Path, images: list[Path], imgsz: int, conf: float = 0.25,
                    batch: int = 16) -> list[tuple[list[str], list[str]]]:
    """Per image, the detected labels and the large objects' labels, from the graph's own yolo
    node (``teachers.yolo``: the same masks, areas and summary the teacher graph records)."""
    from PIL import Image

    from distillery.teachers.base import NodeInput
    from distillery.teachers.nodes.yolo import YoloConfig, YoloNode, large_labels

    node = YoloNode("detector", YoloConfig(weights=str(weights), task="segment", imgsz=imgsz, conf=conf,
                                           large_area=kb.LARGE_AREA, device="cpu"))
    out = []
    for i in range(0, len(images), batch):
        inputs = [NodeInput(str(p), Image.open(p).convert("RGB")) for p in images[i: i + batch]]
        for o in node.run(inputs):
            out.append((o["labels"], large_labels(o["labels"], o["areas"], kb.LARGE_AREA)))
    return out


def answers_right(llm_dir: Path, requests: list[dict], scenes: dict[str, tuple[list[str], list[str]]],
                  top_k: int = 4) -> list[bool]:
    """Per request, whether the greedy answer equals the ground truth; ``scenes``: image ->
    (labels, large objects' labels), what the prompt's detection summary is made of."""
    contexts = retrieval.question_contexts(top_k)
    prompts = [kb.build_prompt(kb.describe_detections(*scenes[r["image"]]),
                               contexts[r["question"]][0], r["question"]) for r in requests]
    tok, model = load_llm(llm_dir)
    outputs = generate(tok, model, prompts)
    return [kb.parse_answer(o) == r["answer"] for o, r in zip(outputs, requests)]


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / max(len(flags), 1), 4)


def evaluate_teachers(world: World, artifacts, split: str = "test", imgsz: int = 160,
                      top_k: int = 4) -> dict:
    """All the teacher figures on ``split``: mAP50s, retrieval recall, LLM accuracies, seconds."""
    t0 = time.time()
    ann = world.annotations(split)
    requests = ann["requests"]
    out = yolo_metrics(artifacts.yolo_weights, world, split, imgsz)
    rec = retrieval.recall(requests, retrieval.question_contexts(top_k))
    out["retrieval_recall"] = round(rec["doc_recall"], 4)
    out["retrieval_all_docs_recall"] = round(rec["all_docs_recall"], 4)
    gt = {im["file"]: (im["labels"], im["large"]) for im in ann["images"]}
    out["llm_acc_gt"] = _share(answers_right(artifacts.llm_dir, requests, gt, top_k))
    files = [im["file"] for im in ann["images"]]
    detected = yolo_detections(artifacts.yolo_weights, [world.split_dir(split) / f for f in files], imgsz)
    right = answers_right(artifacts.llm_dir, requests, dict(zip(files, detected)), top_k)
    out["llm_acc_yolo"] = _share(right)
    for j, key in enumerate(("scene_exact_yolo", "large_exact_yolo")):  # the labels, the large ones
        out[key] = _share([sorted(d[j]) == sorted(gt[f][j]) for f, d in zip(files, detected)])
    out["llm_acc_yolo_by_type"] = {t: _share([ok for ok, r in zip(right, requests) if r["type"] == t])
                                   for t in kb.QUESTION_TYPES}  # the large questions read the masks
    out.update({"split": split, "requests": len(requests), "images": len(files), "top_k": top_k,
                "imgsz": imgsz, "seconds": round(time.time() - t0, 1)})
    return out
