"""How good the demo teachers are, on a split of the world they were trained on.

* YOLO: Ultralytics' own validation (box and mask mAP50) on the split.
* Retriever: recall of the documents each question needs, in the top-k of the real retriever.
* LLM: answer accuracy (greedy decoding) with prompts built from ground-truth detections, and
  from the YOLO teacher's detections; the retrieved context is the real retriever's top-k.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from demo import kb, retrieval
from demo.llm_teacher import generate, load_llm
from demo.world import World


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


def yolo_labels(weights: Path, images: list[Path], imgsz: int, conf: float = 0.25) -> list[list[str]]:
    """Detected class labels per image (what the detector node's summary is made of)."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    out = []
    for r in model.predict([str(p) for p in images], imgsz=imgsz, conf=conf, device="cpu",
                           verbose=False, stream=True):
        out.append([r.names[int(c)] for c in r.boxes.cls.tolist()])
    return out


def answer_accuracy(llm_dir: Path, requests: list[dict], labels_by_image: dict[str, list[str]],
                    top_k: int = 4) -> float:
    """Share of requests whose greedy answer equals the ground truth."""
    contexts = retrieval.question_contexts(top_k)
    prompts = [kb.build_prompt(kb.describe_detections(labels_by_image[r["image"]]),
                               contexts[r["question"]][0], r["question"]) for r in requests]
    tok, model = load_llm(llm_dir)
    outputs = generate(tok, model, prompts)
    right = sum(kb.parse_answer(o) == r["answer"] for o, r in zip(outputs, requests))
    return right / max(len(requests), 1)


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
    gt = {im["file"]: im["labels"] for im in ann["images"]}
    out["llm_acc_gt"] = round(answer_accuracy(artifacts.llm_dir, requests, gt, top_k), 4)
    files = [im["file"] for im in ann["images"]]
    detected = yolo_labels(artifacts.yolo_weights, [world.split_dir(split) / f for f in files], imgsz)
    out["llm_acc_yolo"] = round(answer_accuracy(artifacts.llm_dir, requests, dict(zip(files, detected)),
                                                top_k), 4)
    out["scene_exact_yolo"] = round(sum(sorted(d) == sorted(gt[f]) for f, d in zip(files, detected))
                                    / max(len(files), 1), 4)
    out.update({"split": split, "requests": len(requests), "images": len(files), "top_k": top_k,
                "imgsz": imgsz, "seconds": round(time.time() - t0, 1)})
    return out
