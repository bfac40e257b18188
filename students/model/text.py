"""The student's text side: the built-in decoder (a small pre-LN transformer with a key/value
cache), and what every text side shares: the segment mask and the position layout.

A text side (this ``TextDecoder``, or ``text_base.PretrainedTextDecoder`` around a causal LM)
offers: ``tok_embed`` (nn.Embedding), ``lm_head(h)``, ``blocks`` (their count sizes the cache),
``prefix(p16, texts)`` -> (embeddings, validity, question lengths, positions), ``add_pos(emb,
pos)`` (a segment's embeddings at its text positions), ``run(x, seg, valid, pos, past)`` and
``step(tokens, pos, seg, past)``. Positions are text positions: the image tokens have -g*g..-1,
the first text token 0, every segment starts after the question.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.students.model.config import StudentConfig



class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None = None):
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if past is not None:  # (B, h, L_past, dh) each
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # No dropout on the attention probabilities (only on the residual branches): it draws one
        # random number per score, (B, heads, L, L), and cost ~15% of a CPU training step (measured).
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # mask (B, 1, L, L_keys) additive
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.mlp(self.ln2(x))), (k, v)


def segment_mask(seg: Tensor, valid: Tensor) -> Tensor:
    """(B, 1, L, L) bool, who may attend to whom: the prefix (segment 0) sees the whole prefix;
    a token of segment s sees the prefix and the earlier tokens of segment s; nobody sees
    padding. seg (B, L) segment ids; valid (B, L) bool."""
    qs, ks = seg[:, :, None], seg[:, None, :]  # (B, L, 1), (B, 1, L)
    idx = torch.arange(seg.shape[1], device=seg.device)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, L, L)
    allowed = (ks == 0) & ((qs == 0) | causal) | (qs == ks) & causal
    return (allowed & valid[:, None, :])[:, None]


def _init_weights(module: nn.Module) -> None:
    """GPT-2 / nanoGPT init: every embedding and linear weight N(0, 0.02), biases 0, so a token's
    own embedding is not drowned by position embeddings or by the first layers' updates."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TextDecoder(nn.Module):
    def __init__(self, cfg: StudentConfig, vocab_size: int, image_channels: int, summary_tokens: int = 0):
        super().__init__()
        d, g = cfg.d_model, cfg.image_grid
        self.grid = g
        self.tok_embed = nn.Embedding(vocab_size, d)
        longest = (summary_tokens + cfg.max_question_tokens
                   + max(cfg.max_answer_tokens, cfg.max_rationale_tokens) + 2)
        self.text_pos = nn.Embedding(longest, d)  # summaries, question, then a segment (task token + target)
        self.img_proj = nn.Linear(image_channels, d)
        self.img_pos = nn.Parameter(torch.randn(g * g, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(_init_weights)
        for block in self.blocks:  # residual projections scaled by depth (GPT-2)
            for proj in (block.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / (2 * cfg.n_layers) ** 0.5)

    def lm_head(self, h: Tensor) -> Tensor:
        return F.linear(h, self.tok_embed.weight)  # tied embeddings: (..., d) -> (..., V)

    def add_pos(self, emb: Tensor, pos: Tensor) -> Tensor:
        """Token embeddings (B, L, d) at text positions pos (B, L): learned position embeddings."""
        return emb + self.text_pos(pos)

    def prefix(self, p16: Tensor | None, texts: list[tuple[Tensor, Tensor]]):
        return text_prefix(self, p16, texts)

    def step(self, tokens: Tensor, pos: Tensor, seg: Tensor, past: dict) -> tuple[Tensor, dict]:
        """One greedy step: tokens (B,) at text positions pos (B,) in segment seg (B, 1), after
        the cache ``past`` -> next-token logits (B, V) and the extended cache."""
        x = (self.tok_embed(tokens) + self.text_pos(pos))[:, None]  # (B, 1, d)
        hid, cache = self.run(x, seg, torch.ones(seg.shape, dtype=torch.bool, device=seg.device), past=past)
        return self.lm_head(hid[:, -1]), cache

    def run(self, x: Tensor, seg: Tensor, valid: Tensor, pos: Tensor | None = None,
            past: dict | None = None) -> tuple[Tensor, dict]:
        """Blocks over x (B, L, d) with segment ids seg (B, L) and validity (B, L) (``pos``: unused
        here, the positions are in x already; a rotary text base reads them). With ``past``
        (an earlier call's cache) the new tokens also see the cached keys of the prefix and of
        their own segment. Returns the final hidden states (B, L, d) and the extended cache."""
        mask = additive_mask(seg, valid, past, x.dtype)  # (B, 1, L, L_past + L)
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block(x, mask, past["kv"][i] if past is not None else None)
            kv.append(layer_kv)
        return self.ln_f(x), extend_cache(kv, seg, valid, past)


def additive_mask(seg: Tensor, valid: Tensor, past: dict | None, dtype: torch.dtype) -> Tensor:
    """``segment_mask`` as an additive float mask (B, 1, L, L_past + L) (built once per call: a bool
    mask is converted in every layer); with ``past`` the new tokens also see the cached keys of
    the prefix and of their own segment."""
    mask = segment_mask(seg, valid)  # (B, 1, L, L)
    if past is not None:
        ks = past["seg"][:, None, :]  # (B, 1, L_past)
        old = ((ks == 0) | (ks == seg[:, :, None])) & past["valid"][:, None, :]  # (B, L, L_past)
        mask = torch.cat([old[:, None], mask], -1)  # (B, 1, L, L_past + L)
    return torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill(~mask, float("-inf"))


def extend_cache(kv: list, seg: Tensor, valid: Tensor, past: dict | None) -> dict:
    """The cache after a call: per layer (keys, values) (B, h, L_past + L, dh), the segment ids and
    validity of every cached token."""
    return {"kv": kv, "seg": seg if past is None else torch.cat([past["seg"], seg], 1),
            "valid": valid if past is None else torch.cat([past["valid"], valid], 1)}


def text_prefix(decoder, p16: Tensor | None, texts: list[tuple[Tensor, Tensor]]):
    """[image tokens | text] embeddings (B, Li + Lt, d) and validity, where the text is the
    concatenation of ``texts`` (embeddings (B, L, d), validity (B, L)): what the detection heads
    put there, then the question. ``p16`` None: no image tokens (a text-only step). Also returns
    the number of text tokens (B,), where every segment's positions start, and every token's
    position (B, Li + Lt) (image tokens -g*g..-1). ``decoder``: ``add_pos``, ``img_proj``,
    ``img_pos``, ``grid``."""
    emb, mask = torch.cat([t[0] for t in texts], 1), torch.cat([t[1] for t in texts], 1)  # (B, Lt, d), (B, Lt)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, Lt): padding does not shift positions
    text = decoder.add_pos(emb, pos)
    if p16 is None:
        return text, mask, mask.sum(1), pos
    g2 = decoder.grid * decoder.grid
    img = F.adaptive_avg_pool2d(p16, decoder.grid).flatten(2).transpose(1, 2)  # (B, g*g, C16)
    img = decoder.img_proj(img) + decoder.img_pos  # (B, g*g, d)
    ones = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
    img_pos = torch.arange(-g2, 0, device=pos.device).expand(pos.shape[0], g2)  # (B, g*g)
    return torch.cat([img, text], 1), torch.cat([ones, mask], 1), mask.sum(1), torch.cat([img_pos, pos], 1)
