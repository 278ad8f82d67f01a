from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.embedder.config import EmbedderSettings
from services.gateway.config import GatewaySettings


def test_environment_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "askmesh.toml"
    config.write_text('[embedder]\nport = 7001\nmax_batch_size = 8\n\n[gateway]\nport = 7002\n')
    monkeypatch.setenv("ASKMESH_CONFIG", str(config))
    monkeypatch.setenv("ASKMESH_EMBEDDER_MAX_BATCH_SIZE", "16")
    settings = EmbedderSettings()
    assert settings.port == 7001  # from the file's [embedder] table
    assert settings.max_batch_size == 16  # the environment wins
    assert GatewaySettings().port == 7002


def test_a_malformed_upstream_address_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASKMESH_GATEWAY_EMBEDDER_ADDRESS", "http://embedder")
    with pytest.raises(ValidationError, match="embedder_address"):
        GatewaySettings()
