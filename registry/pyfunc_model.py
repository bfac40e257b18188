"""The student as an MLflow pyfunc model, logged as models-from-code.

MLflow copies this file into the logged model and runs it at load time; ``set_model`` at the
bottom names the model object. Nothing is pickled: ``load_context`` rebuilds the student from
the logged ``student`` artifact folder (safetensors weights + JSON config + tokenizer files).

Input: a DataFrame (or list of dicts) with columns
  image     path, raw bytes, or base64 string (a ``data:image/...;base64,`` prefix is fine);
            behind ``mlflow models serve`` only base64: a client cannot make the server open files
  question  the question text
Output: one row per request, columns ``OUTPUT_COLUMNS``:
  answer           the student's answer
  boxes            [[x1, y1, x2, y2], ...] from the first detection node
  classes, labels, scores
  masks            COCO RLE list as a JSON string ("[]" when the node has no masks)
  documents        retrieved document ids from the first retrieval node
  document_scores
  outputs          every node's full output as a JSON string (for specs with several nodes)
"""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from distillery.images import image_source

# Set in MLflow's scoring server process (`mlflow models serve`, its docker image).
SERVING_ENV = ("__pyfunc_model_path__", "_MLFLOW_IS_IN_SERVING_ENVIRONMENT")
OUTPUT_COLUMNS = ("answer", "boxes", "classes", "labels", "scores", "masks", "documents",
                  "document_scores", "outputs")


class StudentModel(PythonModel):
    """The student for MLflow (load, serve, predict): the torch-free runtime
    (``students.serving.runtime.StudentRuntime``) where the logged folder has ONNX graphs, else
    the torch predictor (``students.serving.predictor.StudentPredictor``)."""

    def load_context(self, context) -> None:
        """Device: ``load_model(uri, model_config={"device": "cuda"})`` runs the torch student
        there; default cpu (the runtime where it can)."""
        from distillery.students.serving.graphs import runtime_ready

        folder = context.artifacts["student"]
        device = (context.model_config or {}).get("device", "cpu")
        if device == "cpu" and runtime_ready(folder):
            from distillery.students.serving.runtime import StudentRuntime

            self.predictor = StudentRuntime.load(folder)
        else:
            from distillery.students.serving.predictor import StudentPredictor

            self.predictor = StudentPredictor.load(folder, device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None,
                ) -> pd.DataFrame:
        """model_input: DataFrame with ``image`` and ``question`` columns (MLflow converts a
        list of dicts into one; the hint stays a plain DataFrame because MLflow warns on unions);
        returns one row per request (see module docstring). Bad input (a missing column, an image
        that is not base64 or not an image, an empty question) raises MlflowException with
        INVALID_PARAMETER_VALUE naming the row and the reason: ``mlflow models serve`` answers 400."""
        try:
            requests = to_requests(model_input, allow_paths=not served())
            results = self.predictor.predict(requests)
        except ValueError as e:  # (the request checks raise ValueError; anything else is ours: 500)
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame([flatten_prediction(r) for r in results], columns=list(OUTPUT_COLUMNS))


def served() -> bool:
    """True behind MLflow's HTTP scoring server (and in log_model's simulation of it)."""
    return any(os.environ.get(k, "").lower() not in ("", "false", "0") for k in SERVING_ENV)


def to_requests(model_input: pd.DataFrame | list[dict], allow_paths: bool = True) -> list[dict]:
    """Rows -> ``[{"image": bytes | path, "question": str}]``, with errors naming the row."""
    if isinstance(model_input, pd.DataFrame):
        missing = {"image", "question"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input: missing column(s) {sorted(missing)}; "
                             "expected 'image' (path, bytes or base64) and 'question'")
        rows = model_input[["image", "question"]].to_dict("records")
    else:
        rows = list(model_input)
    return [_request(i, row, allow_paths) for i, row in enumerate(rows)]


def _request(i: int, row: Any, allow_paths: bool) -> dict:
    if not isinstance(row, dict) or "image" not in row or "question" not in row:
        raise ValueError(f"model input row {i}: expected {{'image': ..., 'question': ...}}, got {row!r:.80}")
    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"model input row {i}: 'question' must be a non-empty string")
    return {"image": image_source(row["image"], f"model input row {i}", allow_paths), "question": question}


def flatten_prediction(result: dict) -> dict:
    """One StudentPredictor result -> one output row (see ``OUTPUT_COLUMNS``)."""
    nodes = {k: v for k, v in result.items() if isinstance(v, dict)}
    det = next((v for v in nodes.values() if "boxes" in v), {})
    rag = next((v for v in nodes.values() if "ids" in v), {})
    answer = result.get("answer")
    if answer is None:
        answer = next((v["answer"] for v in nodes.values() if "answer" in v), "")
    return {
        "answer": str(answer),
        "boxes": [[float(c) for c in box] for box in det.get("boxes", [])],
        "classes": [int(c) for c in det.get("classes", [])],
        "labels": [str(c) for c in det.get("labels", [])],
        "scores": [float(s) for s in det.get("scores", [])],
        "masks": json.dumps(det.get("masks", [])),
        "documents": [str(d) for d in rag.get("ids", [])],
        "document_scores": [float(s) for s in rag.get("scores", [])],
        "outputs": json.dumps(result),
    }


set_model(StudentModel())
