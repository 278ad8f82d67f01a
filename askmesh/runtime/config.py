"""Settings shared by every service.

Each service's settings class reads, highest priority first: keyword arguments, environment
variables (`ASKMESH_<SECTION>_<FIELD>`, e.g. `ASKMESH_EMBEDDER_PORT`), then the `[<section>]`
table of the TOML file named by `ASKMESH_CONFIG`, then the defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

CONFIG_FILE_ENV = "ASKMESH_CONFIG"
_ADDRESS = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


def check_address(value: str) -> str:
    """A `host:port` address, as grpc dials it (no scheme)."""
    match = _ADDRESS.match(value)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{value!r} is not a host:port address")
    return value


class TomlSectionSource(PydanticBaseSettingsSource):
    """The `[section]` table of the TOML file named by $ASKMESH_CONFIG (none when unset)."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        self._values: dict[str, Any] = {}
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            with Path(path).open("rb") as file:
                self._values = dict(tomllib.load(file).get(section, {}))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if k in self.settings_cls.model_fields}


class AskmeshSettings(BaseSettings):
    """Base of every settings class; subclasses set `section` and an env prefix."""

    section: ClassVar[str] = ""
    model_config = SettingsConfigDict(extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlSectionSource(settings_cls, cls.section)


class TelemetrySettings(AskmeshSettings):
    section = "telemetry"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_OTEL_", extra="ignore")

    # none: spans are made (so context still propagates) but not exported.
    # console: JSON spans on stderr. file: one JSON span per line appended to `file`.
    # otlp: OTLP/gRPC to `endpoint` (an OpenTelemetry collector, Jaeger, Tempo, ...).
    exporter: Literal["none", "console", "file", "otlp"] = "none"
    file: Path | None = None
    endpoint: str = "http://127.0.0.1:4317"


# grpc's own default: a caller cannot make a tier hold more than this for one message.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class ServiceSettings(AskmeshSettings):
    """What every gRPC service has: where it listens and how it stops."""

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    # How long SIGTERM waits for calls in flight before ending them.
    grace_period_s: float = Field(default=30.0, ge=0)
    log_level: str = "INFO"
    # Largest request or response message, in bytes: grpc answers a larger one with
    # RESOURCE_EXHAUSTED before it is parsed. Files upload in parts far below it.
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    # Prometheus metrics on http://<host>:<metrics_port>/metrics; 0 serves none.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _metrics_port_free(self) -> ServiceSettings:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port: {self.metrics_port} is the gRPC port too; give metrics their own")
        return self

    @property
    def listen_address(self) -> str:
        return f"{self.host}:{self.port}"
