"""Typed config for training the student (owned by the trainer work)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """How the student is trained."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1)
    seed: int = 0
