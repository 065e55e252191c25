"""A tiny BERT (random weights, local vocabulary) saved to a folder: a backbone for tests, no download."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from shared.config import RunConfig
from shared.schema import Behavior
from simulations.catalog import BROWSE_QUERY_WORDS, CATEGORIES, INTENT_QUERY_WORDS, REVIEW_TEXTS


def _words() -> list[str]:
    texts = [b.value for b in Behavior] + ["stars", ";"] + INTENT_QUERY_WORDS + BROWSE_QUERY_WORDS
    for category, (en, zh, products) in CATEGORIES.items():
        texts += [category, en, zh] + [name for name, _ in products]
    for reviews in REVIEW_TEXTS.values():
        texts += reviews
    # BERT's basic tokenisation: lower case, split on spaces and punctuation, one token per CJK character
    words = sorted(
        {w for t in texts for w in re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+|[^\sa-z0-9]", t.lower())}
    )
    digits = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *digits, *words]


def build_tiny_bert(folder: Path, *, layers: int = 2, hidden: int = 32) -> Path:
    """Write a tiny BERT and its tokenizer to `folder` and return it (loadable by from_pretrained)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(_words())) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 128})
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # reads vocab.txt
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def small_config(tiny_bert: str, **extra: object) -> RunConfig:
    """A short run on the tiny BERT (rank-2 LoRA, batch 16, 32 tokens, 2 rounds), with `extra` keys."""
    return RunConfig.parse(
        {"backbone": tiny_bert, "lora-r": 2, "batch-size": 16, "max-length": 32, "num-rounds": 2, **extra}
    )
