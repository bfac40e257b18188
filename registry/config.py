"""Typed config for the MLflow registry (owned by the registry work)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RegistryConfig(BaseModel):
    """Where students are logged and when the champion alias moves."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None = local SQLite.")
