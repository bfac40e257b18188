"""Typed configs for the student model and its training (owned by the student work)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StudentConfig(BaseModel):
    """Sizes of the multimodal student (filled in by the student work)."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(128, ge=32, description="Square input size of the vision encoder.")


class TrainConfig(BaseModel):
    """How the student is trained (filled in by the student work)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1)
    seed: int = 0
