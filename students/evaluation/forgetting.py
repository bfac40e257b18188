"""Forgetting: what a continually distilled student lost of its champion's fidelity.

A recurring run warm-starts from the champion and trains on new records plus a replay sample of
older ones (``students.training.continual``). Both students are measured against the teacher on
the OLD held-out records (what the champion knew) and on the NEW ones; forgetting is the change
on the old set, signed so that > 0 means the new student lost ground.

    report = forgetting_report(new_student_dir, champion_dir, old_val_records, new_val_records)
    report["old"]         # {"student": headline, "champion": headline, "n"}
    report["forgetting"]  # {metric: champion - student}  (token_kl: student - champion)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from distillery.students.evaluation.metrics import evaluate_student
from distillery.students.evaluation.report import headline_metrics

LOWER_IS_BETTER = frozenset({"token_kl"})  # headline metrics where a smaller value is better


def forgetting(student: Mapping[str, float], champion: Mapping[str, float]) -> dict[str, float]:
    """Per headline metric both have: how much worse the student is than the champion (> 0:
    it lost ground; higher-is-better metrics champion - student, ``LOWER_IS_BETTER`` the reverse)."""
    return {k: (v - champion[k]) if k in LOWER_IS_BETTER else (champion[k] - v)
            for k, v in student.items() if k in champion}


def _model(model: Any):
    """A saved student folder loaded (on the CPU); a model or predictor as is."""
    if isinstance(model, (str, os.PathLike)):
        from distillery.students.model.student import MultimodalStudent

        return MultimodalStudent.from_pretrained(model)
    return model


def forgetting_report(student: Any, champion: Any, old: Sequence, new: Sequence) -> dict[str, Any]:
    """The headline fidelity (vs the teacher records) of the new ``student`` and the ``champion``
    (folders, models or predictors) on the ``old`` and ``new`` held-out records, and the
    ``forgetting`` on the old set. A set with no record is left out."""
    student, champion = _model(student), _model(champion)
    out: dict[str, Any] = {}
    for name, records in (("old", list(old)), ("new", list(new))):
        if records:
            out[name] = {"student": headline_metrics(evaluate_student(student, records)),
                         "champion": headline_metrics(evaluate_student(champion, records)), "n": len(records)}
    if "old" in out:
        out["forgetting"] = forgetting(out["old"]["student"], out["old"]["champion"])
    return out
