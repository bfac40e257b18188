"""Tiny teacher records for the student tests, shaped exactly like the teacher nodes' outputs.

Scenes are coloured rectangles on a grey background (images of different sizes, PNG bytes); the
detector's output has real COCO RLE masks (pycocotools), per-class scores (N, C) float32; the
retriever's ids and float32 scores; the reasoner's text, answer, token ids (int32) and top-k
log-probs (fp16) from a word-level tokenizer saved with ``save_pretrained`` in the llm node's
``model`` folder, which is where the schema finds it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from distillery.teachers.records import TeacherRecord, make_input_id
from distillery.rle import encode as mask_to_rle
from distillery.teachers.nodes.yolo import describe_detections

CLASSES = ["red box", "blue box"]
COLOURS = {"red box": (220, 30, 30), "blue box": (30, 60, 220)}
WORDS = ("<pad> <unk> <eos> <think> </think> how many red blue boxes are there ? is any box "
         "zero one two three yes no + = count x1 x2 x1, x2, (1 (2 large) large),").split()  # + the detector summaries' words
DOCS = [{"id": "doc-red", "text": "Red boxes are hot."}, {"id": "doc-blue", "text": "Blue boxes are cold."},
        {"id": "doc-x", "text": "Nothing here."}]
NUMBERS = ["zero", "one", "two", "three"]
K = 4  # stored top-k
LARGE_AREA = 0.2  # the detector's large_area: a box covering a fifth of its image is large

# (image width, height, [(class, x1, y1, x2, y2) in pixels], question, answer)
SCENES = [
    (96, 80, [("red box", 10, 10, 50, 45)], "how many red boxes are there ?", "one"),
    (80, 80, [("blue box", 30, 20, 70, 70), ("red box", 2, 2, 26, 30)], "how many blue boxes are there ?", "one"),
    (64, 96, [("red box", 5, 40, 40, 90), ("red box", 30, 5, 60, 35)], "how many red boxes are there ?", "two"),
    (90, 70, [("blue box", 40, 10, 85, 60)], "is any box red ?", "no"),
]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=["<think>", "</think>"])


def write_graph(root: Path, segment: bool = True) -> Path:
    """The llm 'model' folder (tokenizer only), the documents file and a spec; returns the spec path."""
    llm = root / "llm"
    build_tokenizer().save_pretrained(str(llm))
    (root / "kb.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    spec = {"name": "student-test", "inputs": {"default_question": "how many red boxes are there ?"},
            "teachers": {
                "detector": {"type": "yolo", "weights": "yolo11n-seg.yaml", "task": "segment",
                             "large_area": LARGE_AREA} if segment else
                            {"type": "yolo", "weights": "yolo11n-seg.yaml", "task": "detect"},
                "retriever": {"type": "rag", "documents": "kb.jsonl", "top_k": 2},
                "reasoner": {"type": "llm", "model": "llm", "prompt": "{detector.summary} {request.question}"}}}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def png(w: int, h: int, objects) -> bytes:
    img = Image.new("RGB", (w, h), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for cls, x1, y1, x2, y2 in objects:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=COLOURS[cls])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def detector_output(w: int, h: int, objects, rng) -> dict:
    boxes = np.array([[x1 / w, y1 / h, x2 / w, y2 / h] for _, x1, y1, x2, y2 in objects], np.float32).reshape(-1, 4)
    classes = np.array([CLASSES.index(o[0]) for o in objects], np.int32)
    probs = rng.uniform(0.0, 0.1, (len(objects), len(CLASSES))).astype(np.float32)
    probs[np.arange(len(objects)), classes] = rng.uniform(0.7, 0.95, len(objects))
    masks, areas = [], []
    for _, x1, y1, x2, y2 in objects:
        m = np.zeros((h, w), np.uint8)
        m[y1:y2, x1:x2] = 1
        masks.append(mask_to_rle(m))
        areas.append(float(m.mean()))
    labels = [CLASSES[c] for c in classes]
    large = [lab for lab, a in zip(labels, areas) if a >= LARGE_AREA]
    return {"boxes": boxes, "classes": classes, "scores": probs[np.arange(len(objects)), classes].astype(np.float32),
            "class_probs": probs, "labels": labels, "masks": masks, "areas": areas,
            "summary": describe_detections(labels, large), "count": len(labels), "image_size": [h, w]}


def retriever_output(question: str) -> dict:
    ids = ["doc-red", "doc-x"] if "red" in question else ["doc-blue", "doc-red"]
    texts = [next(d["text"] for d in DOCS if d["id"] == i) for i in ids]
    return {"query": question, "ids": ids, "scores": np.array([0.8, 0.3], np.float32), "texts": texts,
            "context": "\n".join(texts)}


def reasoner_output(tok, objects, answer: str, rng) -> dict:
    reds = sum(o[0] == "red box" for o in objects)
    blues = len(objects) - reds
    text = f"<think> count red = {NUMBERS[reds]} blue = {NUMBERS[blues]} </think> {answer}"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    T, V = len(ids), len(WORDS)
    logits = rng.normal(0, 1, (T, V))
    logits[np.arange(T), ids] += 6.0  # the teacher is confident in what it generated
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    topk = np.argsort(-logp, -1)[:, :K]
    think = text.split("</think>")[0][len("<think>"):].strip()
    return {"prompt": "p", "text": text, "think": think, "answer": answer,
            "token_ids": np.array(ids, np.int32), "topk_ids": topk.astype(np.int32),
            "topk_logprobs": np.take_along_axis(logp, topk, -1).astype(np.float16), "truncated": False,
            "finish_reason": "eos", "num_generated_tokens": T, "num_prompt_tokens": 3}


def make_records(seed: int = 0) -> list[TeacherRecord]:
    rng = np.random.default_rng(seed)
    tok = build_tokenizer()
    records = []
    for w, h, objects, question, answer in SCENES:
        image = png(w, h, objects)
        records.append(TeacherRecord(
            input_id=make_input_id(image, question), graph_fingerprint="test", image_path=f"{question[:8]}.png",
            question=question, image_bytes=image,
            outputs={"detector": detector_output(w, h, objects, rng), "retriever": retriever_output(question),
                     "reasoner": reasoner_output(tok, objects, answer, rng)}))
    return records


def tiny_config(**kw):
    from distillery.students.model.config import StudentConfig

    base = dict(image_size=64, vision_widths=(8, 16, 32, 32), image_grid=4, d_model=32, n_layers=2, n_heads=2,
                det_width=16, num_prototypes=8, max_question_tokens=12, max_answer_tokens=6,
                max_rationale_tokens=24, hflip=0.0)
    return StudentConfig(**(base | kw))
