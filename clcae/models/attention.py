"""The W+ and F cross-attention blocks (paper Eq. 4 and 5) and the latent encoder's transformer layer.

Both follow the authors' module layout (a DETR decoder layer without self-attention: multi-head attention,
residual + LayerNorm, FFN, residual + LayerNorm), so their checkpoints load key for key.  ``norm1`` is
unused in the forward pass but exists in their state_dict, so it exists here.

With one key/value token, softmax attention is identically 1 and the block reduces to
``out_proj(v_proj(memory))`` broadcast over the queries: Q and K never matter.  We compute that shortcut in
eval mode (exact: softmax over one logit is exactly 1.0) because the F block would otherwise project 4096
query tokens for nothing; in training the full attention runs so attention dropout behaves as in the
authors' code.  ``tokens > 1`` is our non-degenerate variant: the memory vector is expanded into several
learned tokens, so the attention weights depend on the query.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _single_token_attention(attn: nn.MultiheadAttention, memory: torch.Tensor, n_query: int) -> torch.Tensor:
    """MHA output when the memory holds one token: out_proj(v_proj(m)), broadcast to every query."""
    d = attn.embed_dim
    w_v = attn.in_proj_weight[2 * d:]
    b_v = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    v = F.linear(memory, w_v, b_v)
    out = attn.out_proj(v)
    return out.expand(-1, n_query, -1)


def _use_shortcut(attn: nn.MultiheadAttention, memory: torch.Tensor, training: bool) -> bool:
    return memory.shape[1] == 1 and (not training or attn.dropout == 0.0)


class CrossAttention(nn.Module):
    """query (B, Lq, D) attends to memory (B, Lm, D); returns (B, Lq, D) = LN3(x + FFN(x)), x = LN2(q + Attn)."""

    def __init__(self, d_model: int = 512, nhead: int = 4, dim_feedforward: int = 1024, dropout: float = 0.1,
                 tokens: int = 1):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)  # unused (as in the authors' code); kept for their state_dict
        self.norm1.requires_grad_(False)     # so DDP does not wait for gradients that never come
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.tokens = tokens
        if tokens > 1:
            self.tokenizer = nn.Linear(d_model, tokens * d_model)

    def expand_memory(self, memory: torch.Tensor) -> torch.Tensor:
        if self.tokens == 1:
            return memory
        b, n, d = memory.shape
        return self.tokenizer(memory).view(b, n * self.tokens, d)

    def attend(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        memory = self.expand_memory(memory)
        if _use_shortcut(self.multihead_attn, memory, self.training):
            return _single_token_attention(self.multihead_attn, memory, query.shape[1])
        return self.multihead_attn(query, memory, memory, need_weights=False)[0]

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm2(query + self.dropout2(self.attend(query, memory)))
        return self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class TransformerEncoderLayer(nn.Module):
    """DETR's post-norm encoder layer (the latent encoder of the contrastive module).

    The positional embedding is added to queries and keys only, as in DETR; with CLCAE's single latent token
    it has no effect on the output, which the module keeps for checkpoint compatibility.
    """

    def __init__(self, d_model: int = 512, nhead: int = 4, dim_feedforward: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        if _use_shortcut(self.self_attn, src, self.training):
            attn = _single_token_attention(self.self_attn, src, src.shape[1])
        else:
            qk = src if pos is None else src + pos
            attn = self.self_attn(qk, qk, src, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))
