"""A tiny random-weight Llama base model folder, for tests that need a real model folder but no
trained model: the registry (fingerprint, module shapes), the service, the tokenizer, a LocalScorer.

    model_dir = build_tiny_model(tmp_path / "model")

Hidden size 128, 2 heads, 2 layers, a byte-level BPE tokenizer trained on a few sentences (about
400 tokens). Weights are random with a fixed seed, so the folder — and its fingerprint — is the
same on every build. It loads in vLLM as well (Llama architecture, safetensors, fast tokenizer).
`build_sentencepiece_tokenizer` makes a tokenizer laid out like Llama-2's instead, for tests of
what a SentencePiece vocabulary changes (word-boundary markers, byte fallback).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB_SIZE = 400
_CORPUS = (
    "Question: What genre does the author write?\nAnswer: The author writes mystery novels.",
    "Question: Where was the author born?\nAnswer: The author was born in a small harbour town.",
    "Question: Which award did the author win?\nAnswer: The author won the Golden Lantern Prize.",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}-+*/=<>_@#$%&",
    "Hello world, forgetting views of one base model, served to many tenants at once.",
)


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small fixed corpus (deterministic)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_sentencepiece_tokenizer(texts: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A tokenizer laid out like Llama-2's tokenizer.json, trained on `texts` (deterministic).

    A normalizer prepends "▁" to the text and turns every space into "▁"; BPE pieces never hold
    "▁" inside or join punctuation to a word (as in Llama's vocabulary; here a pre-tokenizer
    enforces it); characters outside the vocabulary fall back to <0xNN> byte tokens; BOS is added.
    So a separately encoded " answer" gets an extra "▁" token that the joint text never has.
    """
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", behavior="merged_with_next"),
                                                  pre_tokenizers.Punctuation("isolated")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    # The 256 byte tokens are ordinary vocabulary entries, as in Llama's (not added tokens).
    layout = json.loads(core.to_str())
    vocab = layout["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    core = Tokenizer.from_str(json.dumps(layout))
    core.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", core.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def build_tiny_model(directory: str | Path, *, seed: int = 0,
                     tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """Write a random-init LlamaForCausalLM (hidden 128, 2 heads, 2 layers) and its tokenizer
    (default: `build_tokenizer()`) to `directory` with `save_pretrained`; return the folder.
    Reuses a folder that already holds one."""
    root = Path(directory)
    if (root / "config.json").is_file() and (root / "tokenizer.json").is_file():
        return root
    tokenizer = tokenizer or build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root
