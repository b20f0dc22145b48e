"""SASRec (Kang & McAuley 2018) in the RecBole / DuoRec configuration.

Post-LayerNorm transformer blocks over item + learned position embeddings, causal self-attention
with a padding mask, and the item embedding table reused as the output layer (full softmax over
all items). Inputs are LEFT-padded with 0, so the sequence representation is the last column's
hidden state, and the last block computes only that column (its keys and values still come from
every column): the same function at about 60% of the encoder's arithmetic. Attention runs through
``F.scaled_dot_product_attention`` (fused kernels on GPU); training on the CPU spells it out so
its dropout draws byte masks (:mod:`.dropout`). Nothing in the forward pass reads a value back to
the host. The output layer (the logits over all
items, for the cross-entropy and the ranking) is computed in float32 even under bf16 autocast:
bf16 logits (8 mantissa bits) would tie many items in the ranking and coarsen the softmax, for a
matmul that costs next to nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dropout import Dropout, dropout


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _Block(nn.Module):
    """Attention then feed-forward, each followed by dropout, a residual and LayerNorm
    (post-LN, as RecBole's ``TransformerLayer``)."""

    def __init__(
        self, hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float, eps: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ff_in = nn.Linear(hidden, inner)
        self.ff_out = nn.Linear(inner, hidden)
        self.ff_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)

    def _attention(self, q, k, v, mask):
        p = self.attn_dropout if self.training else 0.0
        if p == 0.0 or q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        # SDPA's CPU path would draw its dropout with bernoulli_ (see .dropout).
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        weights = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
        return dropout(weights, p) @ v

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``(b, L, hidden)`` -> ``(b, L, hidden)``; with ``last_only`` -> ``(b, 1, hidden)``, the
        last column only (every column still serves as a key and a value)."""
        b, _, hidden = x.shape
        d = hidden // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, d).transpose(1, 2)

        if last_only:
            w, bias = self.qkv.weight, self.qkv.bias
            k, v = map(heads, F.linear(x, w[hidden:], bias[hidden:]).chunk(2, dim=-1))
            x, mask = x[:, -1:], mask[..., -1:, :]
            q = heads(F.linear(x, w[:hidden], bias[:hidden]))
        else:
            q, k, v = map(heads, self.qkv(x).chunk(3, dim=-1))
        a = self._attention(q, k, v, mask)
        a = a.transpose(1, 2).reshape(b, -1, hidden)
        x = self.attn_norm(x + self.dropout(self.attn_out(a)))
        return self.ff_norm(x + self.dropout(self.ff_out(F.gelu(self.ff_in(x)))))


class SASRec(nn.Module):
    """Self-attentive sequential recommender.

    Args:
        num_items: item ids are ``1..num_items``; 0 is padding.
        max_len: longest input; wider inputs raise.
        mask_token: reserve id ``num_items + 1`` (CL4SRec's mask augmentation), so the
            embedding table has ``num_items + 2`` rows; the mask token is never scored.
        hidden, layers, heads, inner: transformer sizes (the protocol's: 64, 2, 2, 256).
        dropout, attn_dropout: on hidden states and attention weights (0.5, 0.5).
        eps: LayerNorm epsilon (1e-12, as RecBole).

    Positions count from each sequence's first item (RecBole's convention with right padding),
    so extra left padding changes nothing: a padded column only attends to itself, and no real
    column ever attends to a padded one.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        *,
        mask_token: bool = False,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 2,
        inner: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        for name, value in (("num_items", num_items), ("max_len", max_len), ("hidden", hidden),
                            ("layers", layers), ("heads", heads), ("inner", inner)):
            _check_positive_int(name, value)
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        for name, value in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        self.num_items = num_items
        self.max_len = max_len
        self.hidden = hidden
        self.item_emb = nn.Embedding(num_items + (2 if mask_token else 1), hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=eps)
        self.emb_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            _Block(hidden, heads, inner, dropout, attn_dropout, eps) for _ in range(layers)
        )
        self.apply(self._init)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        # Built once (not per forward); non-persistent, so state dicts are unchanged.
        self.register_buffer(
            "causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False
        )
        self.register_buffer("eye", torch.eye(max_len, dtype=torch.bool), persistent=False)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def mask_token(self) -> int | None:
        """The mask item id, or None when the table has no mask row."""
        return self.num_items + 1 if self.item_emb.num_embeddings == self.num_items + 2 else None

    def encode(self, inputs: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states of every position, ``(b, L, hidden)``; with ``last_only`` the last
        block computes the last position only, ``(b, 1, hidden)``."""
        if inputs.dim() != 2 or inputs.shape[1] > self.max_len:
            raise ValueError(
                f"inputs must be (b, L) with L <= max_len={self.max_len}, got {tuple(inputs.shape)}"
            )
        real = inputs != 0
        positions = (real.long().cumsum(1) - 1).clamp_min(0)
        x = self.emb_dropout(self.emb_norm(self.item_emb(inputs) + self.pos_emb(positions)))
        length = inputs.shape[1]
        causal, eye = self.causal[:length, :length], self.eye[:length, :length]
        # Every query keeps at least itself, so all-padding rows never produce NaN softmaxes.
        mask = (causal & real[:, None, :]) | eye
        mask = mask[:, None]  # broadcast over heads
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=last_only and i == last)
        return x

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Sequence representation ``(b, hidden)``: the last (most recent) column's state."""
        return self.encode(inputs, last_only=True)[:, -1]

    def output_weight(self) -> torch.Tensor:
        """The item embeddings of the real items ``1..num_items``, used as the output layer."""
        return self.item_emb.weight[1 : self.num_items + 1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``(b, num_items)`` float32 (or float64) logits of items ``1..num_items`` (column ``t`` is item
        ``t + 1``), for the cross-entropy with targets shifted by one. Autocast is off here:
        the product runs in float32 whatever the surrounding autocast region."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            return h.to(dtype) @ self.output_weight().to(dtype).T

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Full-softmax cross-entropy of the next item over all real items."""
        return F.cross_entropy(self.logits(h), targets - 1)

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(b, num_items + 1)`` float32 scores for full ranking; column 0 (padding) is
        ``-inf``."""
        return F.pad(self.logits(self.forward(inputs)), (1, 0), value=-math.inf)
