"""Modelling code shipped inside every merged export (`fedbehavior export`), the Hugging Face way.

This file is copied verbatim into the export folder and named in its `config.json` `auto_map`, so
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` loads the model
without fedbehavior or peft installed. It therefore imports only torch and transformers.

Why custom code: the classifier head reads the attention-masked mean of BERT's last hidden states
(the pooling that sentence-transformers backbones such as MiniLM were trained for), and no stock
transformers class pools that way. The config has its own `model_type` so that loading without
`trust_remote_code=True` fails loudly instead of silently falling back to [CLS] pooling.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput


class FedBehaviorBertConfig(BertConfig):
    """A `BertConfig` under its own model type (see the module docstring)."""

    model_type = "fedbehavior_bert"


class FedBehaviorBertForSequenceClassification(BertForSequenceClassification):
    """BERT + a linear head on the masked mean of the last hidden states. Weight names are those of
    `BertForSequenceClassification` (`bert.*`, `classifier.*`)."""

    config_class = FedBehaviorBertConfig

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        """Logits (and the cross-entropy loss when `labels` are given)."""
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # padding positions count neither in the sum nor in the divisor
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        if getattr(self.config, "normalize_pooled", False):  # pooling "mean-l2": unit-length embedding
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        logits = self.classifier(self.dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
