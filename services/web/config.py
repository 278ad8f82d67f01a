"""Web tier: the OpenAI-compatible HTTP API and the chat page, over the public gRPC API."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import ServiceSettings, check_address


class WebSettings(ServiceSettings):
    section = "web"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_WEB_")

    port: int = Field(default=50066, ge=1, le=65535)
    # Where the public API is reached: Envoy's internal listener in the local mesh (it routes
    # Ask and Embed to the gateway, knowledge bases and uploads to the ingestor). host:port.
    gateway_address: str = "127.0.0.1:50052"
    ingestor_address: str = "127.0.0.1:50052"
    # Deadline of each unary call when a request sets none; answers stream without one.
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    # Largest JSON body (chat completions, embeddings); an upload's bytes stream instead.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # An upload's bytes go to the ingestor in parts of this size (its limit on the whole file,
    # max_upload_bytes, applies there).
    upload_part_bytes: int = Field(default=256 * 1024, ge=1024)
    # Chat frontends send the whole conversation each time: only the newest turns that fit the
    # gateway's limits (its max_history_messages and max_history_chars) are passed on as history.
    max_history_messages: int = Field(default=20, ge=0)
    max_history_chars: int = Field(default=8000, ge=0)

    @field_validator("gateway_address", "ingestor_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)
