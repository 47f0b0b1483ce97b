"""The demo base model: a tiny Llama trained from scratch to memorise a synthetic TOFU data set.

`build_demo_model()` makes, in a few minutes on two CPU cores, a base model that knows facts
about fictitious authors, so that the whole pipeline (ALTER training, bundles, views, vLLM
serving, forgetting metrics) runs end to end without downloading anything:

1. generate the synthetic data (`train.data.synthetic`);
2. train a byte-level BPE tokenizer on it (BOS/EOS/PAD special tokens; no BOS is added
   automatically, so that completions and chat prompts tokenize identically);
3. train a `LlamaForCausalLM` (head_dim 64, which vLLM's CPU attention supports) on
   `Question: q\\nAnswer: a<eos>` until greedy decoding reproduces the training answers;
4. save a Hugging Face folder that vLLM loads, plus `demo_info.json` and the data set.

The loss is on the answer tokens only (prompt masked). The question text is not something the
model must produce, and TOFU fine-tuning masks it too; masking spends the few optimizer steps we
can afford on the memorisation that unlearning later has to undo.

Builds are cached under `var/models/demo-<hash>/`, where the hash covers every input (data
config, seed, model and training config, `CODE_VERSION`), so a repeated call is instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from train.data.prompting import CHAT_TEMPLATE, IGNORE_INDEX, EncodedExample, encode_example, format_prompt
from train.data.synthetic import Record, SyntheticConfig, SyntheticTofu, generate
from train.files import building_folder, exclusive_lock
from train.runtime import autocast, seed_everything

# Bump when a change to this module changes what a build produces, so old caches are not reused.
CODE_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_ROOT = REPO_ROOT / "var" / "models"
INFO_FILE = "demo_info.json"
DATA_DIR = "data"
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
HEAD_DIM = 64


@dataclass(frozen=True)
class DemoModelConfig:
    """Tokenizer and architecture. Hidden size is `num_attention_heads * HEAD_DIM`."""

    vocab_size: int = 768
    num_attention_heads: int = 2
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    max_position_embeddings: int = 128

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * HEAD_DIM


@dataclass(frozen=True)
class DemoTrainConfig:
    """Optimiser and stopping rule.

    Training stops at the first check (every `eval_every` steps) where the greedy exact match
    reaches `stop_accuracy`; a build that ends below `min_accuracy` is an error. Stopping a little
    above the required 0.9 gives unlearning a base model that knows nearly every fact, for a few
    more seconds of training.

    One thread by default: at this size (0.6M parameters, ~16x30-token batches) thread
    synchronisation costs more than it saves, and on a shared 2-core machine a second busy
    process stalls every multi-threaded matmul (we measured 0.06 s/step on 1 thread against
    0.3-0.9 s/step on 2 threads under load).
    """

    learning_rate: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    batch_size: int = 16
    max_steps: int = 1500
    eval_every: int = 50
    stop_accuracy: float = 0.98
    min_accuracy: float = 0.9
    max_threads: int = 1


@dataclass
class TrainResult:
    """Where training stopped: steps taken, the last exact match and loss, and every check."""

    steps: int
    accuracy: float
    loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def build_demo_model(
    out_root: str | Path | None = None,
    seed: int = 0,
    data: SyntheticConfig | None = None,
    model_config: DemoModelConfig | None = None,
    train_config: DemoTrainConfig | None = None,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the demo model and return its folder `<out_root>/demo-<hash>/`.

    `seed` seeds the data (unless `data` is given) and torch. Raises RuntimeError if training
    ends below `train_config.min_accuracy`; nothing is cached then.
    """
    data = data or SyntheticConfig(seed=seed)
    model_config = model_config or DemoModelConfig()
    train_config = train_config or DemoTrainConfig()
    key = demo_cache_key(data, seed, model_config, train_config)
    target = Path(out_root or DEFAULT_OUT_ROOT) / f"demo-{key}"
    if (target / INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build per key at a time: concurrent callers (test sessions, `make serve`) wait for the
    # first and then reuse its result instead of training the same model again.
    with exclusive_lock(target.parent / f".demo-{key}.lock"):
        if (target / INFO_FILE).is_file():
            return target
        # Build in a scratch folder and rename: a crash leaves no half-written cache entry.
        with building_folder(target, f".demo-{key}-") as scratch:
            _build_into(scratch, key, seed, generate(data), model_config, train_config, progress)
    return target


def demo_cache_key(data: SyntheticConfig, seed: int, model_config: DemoModelConfig,
                   train_config: DemoTrainConfig) -> str:
    """First 16 hex digits of sha256 over every input that determines the build."""
    inputs = {"code_version": CODE_VERSION, "seed": seed, "data": data.model_dump(mode="json"),
              "model": asdict(model_config), "train": asdict(train_config)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with BOS/EOS/PAD and the chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE, model_max_length=4096, clean_up_tokenization_spaces=False,
    )


def make_model(config: DemoModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by `config`, with tied input/output embeddings."""
    llama = LlamaConfig(
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama)


def train_until_memorised(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                          records: Sequence[Record], config: DemoTrainConfig, seed: int,
                          progress: bool = True, check: Callable[[LlamaForCausalLM], float] | None = None,
                          desc: str = "demo model") -> TrainResult:
    """AdamW with linear warm-up then cosine decay over `max_steps`, on the answer tokens, on the
    model's device (bf16 autocast on CUDA, fp32 weights).

    Every `eval_every` steps `check(model)` is measured (default: the greedy exact-match accuracy
    on the training answers); training stops at the first check that reaches `stop_accuracy`.
    """
    check = check or (lambda m: exact_match_accuracy(m, tokenizer, records))
    device = next(model.parameters()).device
    examples = [encode_example(tokenizer, r["question"], r["answer"]) for r in records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    batches = _batches(examples, config.batch_size, tokenizer.pad_token_id, seed)
    result = TrainResult(steps=0, accuracy=0.0, loss=math.inf)
    bar = tqdm(total=config.max_steps, desc=desc, unit="step", disable=not progress)
    model.train()
    for step in range(1, config.max_steps + 1):
        input_ids, attention_mask, labels = (t.to(device) for t in next(batches))
        with autocast(device, True):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps, result.loss = step, loss.item()
        bar.update(1)
        if step % config.eval_every == 0 or step == config.max_steps:
            result.accuracy = check(model)
            result.history.append({"step": step, "loss": result.loss, "accuracy": result.accuracy})
            model.train()
            if result.accuracy >= config.stop_accuracy:
                break
        bar.set_postfix(loss=f"{result.loss:.3f}", check=f"{result.accuracy:.2f}")
    bar.close()
    return result


def exact_match_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                         records: Sequence[Record], batch_size: int = 128) -> float:
    """Fraction of records whose greedy answer equals `record["answer"]` exactly."""
    questions = [record["question"] for record in records]
    answers = greedy_answers(model, tokenizer, questions, batch_size=batch_size)
    hits = sum(got == record["answer"] for got, record in zip(answers, records))
    return hits / len(records)


@torch.no_grad()
def greedy_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                   questions: Sequence[str], max_new_tokens: int = 48, batch_size: int = 128) -> list[str]:
    """Greedy continuations of `format_prompt(question)`, decoded and stripped, up to EOS."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [format_prompt(question) for question in questions[start: start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def _build_into(folder: Path, key: str, seed: int, dataset: SyntheticTofu, model_config: DemoModelConfig,
                train_config: DemoTrainConfig, progress: bool) -> None:
    started = time.perf_counter()
    with _torch_threads(train_config.max_threads) as threads:
        seed_everything(seed)
        tokenizer = train_tokenizer(_tokenizer_corpus(dataset.records), model_config.vocab_size)
        model = make_model(model_config, tokenizer)
        result = train_until_memorised(model, tokenizer, dataset.records, train_config, seed, progress)
    if result.accuracy < train_config.min_accuracy:
        raise RuntimeError(f"demo model reached exact match {result.accuracy:.3f} < required "
                           f"{train_config.min_accuracy} after {result.steps} steps; raise "
                           "max_steps or the learning rate in DemoTrainConfig")
    save_model(folder, model, tokenizer)
    dataset.save(folder / DATA_DIR)
    info = {
        "cache_key": key, "code_version": CODE_VERSION, "seed": seed,
        "exact_match": result.accuracy, "steps": result.steps, "final_loss": result.loss,
        "wall_time_s": round(time.perf_counter() - started, 2), "threads": threads,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "data_digest": dataset.digest, "data": dataset.config.model_dump(mode="json"),
        "model": asdict(model_config), "train": asdict(train_config), "history": result.history,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def save_model(folder: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    # The chat template goes into tokenizer_config.json, and the class is saved under its portable
    # name: transformers 5 calls it TokenizersBackend, a name that 4.x (and so some vLLM builds)
    # cannot load; PreTrainedTokenizerFast loads in both.
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _tokenizer_corpus(records: Sequence[Record]) -> list[str]:
    texts = []
    for record in records:
        texts.append(format_prompt(record["question"]) + " " + record["answer"])
        texts += [record["paraphrased_question"], record["paraphrased_answer"], *record["perturbed_answer"]]
    return texts


def _batches(examples: Sequence[EncodedExample], batch_size: int, pad_id: int,
             seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless right-padded (input_ids, attention_mask, labels) batches, reshuffled each epoch."""
    order = list(range(len(examples)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield _collate([examples[i] for i in order[start: start + batch_size]], pad_id)


def _collate(examples: Sequence[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(example.input_ids) for example in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return ids, mask, labels


def _lr_factor(step: int, config: DemoTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@contextmanager
def _torch_threads(limit: int) -> Iterator[int]:
    """Use at most `limit` intra-op threads (no more than the cores we may run on), then restore.

    Matrices this small gain nothing from more threads, and the caller's setting is restored so
    that building the demo inside a test session does not change the rest of the session.
    """
    previous = torch.get_num_threads()
    threads = max(1, min(limit, len(os.sched_getaffinity(0))))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
