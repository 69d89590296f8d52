"""Tiny Hugging Face checkpoints with a real tokenizer, built locally (nothing downloaded).

`synthetic_corpus` writes structured text from a small grammar, so a model trained on it for a
few hundred CPU steps has real attention patterns to distil (copying subjects, agreement,
counting) — a signal random weights do not give.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ascend_edit.models.loading import build_from_config

SUBJECTS = ["the cat", "a dog", "the old king", "my friend", "the river", "a young queen", "the bird"]
VERBS = ["sees", "follows", "loves", "fears", "remembers", "calls", "finds"]
OBJECTS = ["the moon", "a stone", "the garden", "her brother", "the sea", "a golden ring", "the tower"]


def synthetic_corpus(documents: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        subject = rng.choice(SUBJECTS)
        lines = []
        for i in range(rng.randint(3, 8)):
            count = rng.randint(1, 5)
            lines.append(f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {' '.join(['again'] * count)}.")
            if i % 3 == 2:
                lines.append(f"and so {subject} rests.")
        docs.append(" ".join(lines))
    return docs


def char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    alphabet = sorted(set("".join(texts)) | set("abcdefghijklmnopqrstuvwxyz .,!?'\n"))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def make_tiny_checkpoint(path: Path, arch: str = "qwen3", train_steps: int = 0, seed: int = 0,
                         seq_len: int = 64, **overrides) -> Path:
    """Save a tiny model (+ tokenizer + corpus.txt) to `path`; optionally pre-train it on the corpus."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    docs = synthetic_corpus(seed=seed)
    tokenizer = char_tokenizer(docs)
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=64, max_position_embeddings=512,
               eos_token_id=1, pad_token_id=0, bos_token_id=1)
    if arch == "qwen3_moe":
        cfg.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    cfg.update(overrides)
    if len(tokenizer) > cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {cfg['vocab_size']}")
    model = build_from_config(arch, cfg)
    if train_steps:
        _pretrain(model, tokenizer, docs, train_steps, seq_len)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "corpus.txt").write_text("\n\n".join(docs))
    return path


def _pretrain(model, tokenizer, docs, steps: int, seq_len: int) -> None:
    ids = torch.tensor([t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]])
    usable = (len(ids) // seq_len) * seq_len
    data = ids[:usable].view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
