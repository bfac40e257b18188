"""Typed config for the student model (owned by the student-model work)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StudentConfig(BaseModel):
    """Sizes of the multimodal student."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(128, ge=32, description="Square input size of the vision encoder.")
