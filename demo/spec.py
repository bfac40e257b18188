"""The demo's spec: its teacher graph (a YOLO segmenter, a MiniLM+FAISS retriever, a reasoning
LLM) and the student, training and registry settings of each preset. ``demo/pipeline.py`` (which
re-exports ``write_spec`` and ``PRESETS``), ``demo/fidelity.py``, ``demo/example.py``,
``demo/blackbox.py`` and the benchmarks write their specs with it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

# Student, training and registry settings per preset. `tiny` is a plumbing check (CI); `full` is
# sized to meet the goals on 2 CPU cores within the demo's time budget.
PRESETS = {
    "tiny": {"training": {"epochs": 1, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 50,
                          "val_fraction": 0.25},
             "registry": {"gate": {}}},
    # The student: a lighter vision encoder than the library default and 2 x 2 image tokens (the
    # answer reads the per-class count slots; the image tokens add little), for batch-1 speed.
    # Dropout 0.1 on the text decoder's residual branches: without it the text side memorizes its
    # 2,400 training answers (test agreement 0.90 after 11 epochs; with it 0.930 after 10 epochs,
    # 0.922 after 8, which keep the cold demo in its budget: training 540 s instead of 780). max_det
    # 20: a scene holds at most 7 objects, and the large counts decode masks for that many peaks only.
    "full": {"student": {"vision_widths": [16, 24, 48, 96], "det_width": 48, "image_grid": 2, "dropout": 0.1,
                         "max_det": 20},
             "training": {"epochs": 8, "batch_size": 32, "lr": 1e-3, "warmup_steps": 50, "text_echo": 6,
                          "checkpoint_every": 200, "val_fraction": 0.1, "agreement_every": 4},
             "registry": {"gate": {"answer_agreement": 0.9}}},
}


def write_spec(path: Path, name: str, yolo_weights: Path, kb: Path, llm_dir: Path, preset: str,
               reasoner: dict | None = None, registry: dict | None = None) -> Path:
    """The demo's spec: a YOLO segmenter (whose masks say which objects are large), a MiniLM+FAISS
    retriever and a reasoning LLM (``reasoner``: another node config for it, e.g. the black-box
    ``openai`` node of ``demo.blackbox``; ``registry``: settings over the preset's)."""
    from distillery.demo.kb import LARGE_AREA, PROMPT_TEMPLATE

    spec = {
        "name": name,
        "inputs": {"default_question": "How many hazards are there?"},
        "teachers": {
            "detector": {"type": "yolo", "weights": str(yolo_weights), "task": "segment",
                         "imgsz": 160, "conf": 0.25, "batch_size": 16, "large_area": LARGE_AREA},
            "retriever": {"type": "rag", "documents": str(kb), "embedder": "all-MiniLM-L6-v2",
                          "query": "{request.question}", "top_k": 4,
                          "cache_dir": str(path.parent / "cache" / "rag-index")},
            "reasoner": reasoner or {"type": "llm", "model": str(llm_dir), "prompt": PROMPT_TEMPLATE,
                                     "max_new_tokens": 96, "batch_size": 16},
        },
        "record": {"shard_size": 128},
        **PRESETS[preset],
    }
    if registry:
        spec["registry"] = {**spec["registry"], **registry}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    os.replace(tmp, path)
    return path
