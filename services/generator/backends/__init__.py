"""Generation backends behind one interface (see base.py)."""

from __future__ import annotations

from services.generator.backends.base import GenerationBackend
from services.generator.config import GeneratorSettings


def create_backend(settings: GeneratorSettings) -> GenerationBackend:
    if settings.backend == "local":
        from services.generator.backends.local import LlamaCppBackend

        return LlamaCppBackend(settings)
    if not settings.url:
        raise ValueError(f"generator.url: required for the {settings.backend!r} backend")
    if settings.backend == "tgi":
        from services.generator.backends.tgi import TgiBackend

        return TgiBackend(settings)
    from services.generator.backends.openai_compatible import OpenAICompatibleBackend

    return OpenAICompatibleBackend(settings)
