"""A pretrained causal LM as the student's text side (``StudentConfig.text_base``).

The base's own blocks, token embeddings, final norm and (tied or not) output layer replace the
built-in decoder; the student's design stays: [image tokens | class slots | question | segments]
go in as ``inputs_embeds`` with the student's 4D additive segment mask (transformers passes a 4D
mask through as it is), rotary positions from the student's text positions (image tokens first),
and a key/value cache read back from transformers' ``DynamicCache`` as plain (keys, values)
tensors per layer, so the ONNX graphs take the same inputs and outputs as the built-in decoder's.

    x (B, L, d) --base blocks (mask: segment_mask, positions: g*g + text position)--> h (B, L, d)
    logits = h @ embed^T (tied) or the base's lm_head

Frozen parts (``freeze_text_layers`` N): the token embeddings and the first N blocks. LoRA
(``lora_rank`` > 0, ``peft``): adapters on ``lora_targets``, every base weight frozen; the saved
student has them merged (``merged_state``), so loading and serving never need peft.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.students.model.config import StudentConfig
from distillery.students.model.text import additive_mask, extend_cache, text_prefix

BASE_DIR = "text_base"  # the base's architecture config inside a saved student folder
ADAPTER = "default"


def base_config(source: str):
    """The base's transformers config from a local folder (or the local hub cache): never a download."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"text_base {source}: no causal LM config there or in the local cache "
                                f"(models are never downloaded at run time): {e}") from None


class PretrainedTextDecoder(nn.Module):
    """The text side from ``source`` (a causal LM folder). ``load_weights`` False: the
    architecture alone (a saved student's weights are loaded over it); ``lora`` False: no adapters
    (a saved student's are merged)."""

    def __init__(self, cfg: StudentConfig, vocab_size: int, image_channels: int, source: str,
                 load_weights: bool = True, lora: bool = True):
        super().__init__()
        from transformers import AutoModelForCausalLM

        conf = base_config(source)
        if load_weights:
            lm = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, trust_remote_code=False,
                                                      attn_implementation="sdpa", dtype=torch.float32)
        else:
            lm = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa", dtype=torch.float32)
        if vocab_size > lm.get_input_embeddings().num_embeddings:  # the records hold ids past its table
            lm.resize_token_embeddings(vocab_size)
        self.config = lm.config
        self.body = lm.get_decoder()  # embeddings, blocks, final norm (Qwen2Model, LlamaModel, ...)
        out = lm.get_output_embeddings()
        self.tied = out is None or out.weight is self.body.get_input_embeddings().weight
        self.head = None if self.tied else out
        d, g = int(self.config.hidden_size), cfg.image_grid
        self.grid = g
        self.img_proj = nn.Linear(image_channels, d)
        self.img_pos = nn.Parameter(torch.randn(g * g, d) * 0.02)
        if lora and cfg.lora_rank:
            self._add_lora(cfg)
        if cfg.freeze_text_layers:
            self.tok_embed.requires_grad_(False)
            for block in self.blocks[: cfg.freeze_text_layers]:
                block.requires_grad_(False)

    @property
    def tok_embed(self) -> nn.Embedding:
        return self.body.get_input_embeddings()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body.layers

    def _add_lora(self, cfg: StudentConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        names = {n.rsplit(".", 1)[-1] for n, m in self.body.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(set(cfg.lora_targets) - names)
        if unknown:
            raise ValueError(f"lora_targets {unknown}: no such linear layer in the text base (it has {sorted(names)})")
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                           target_modules=list(cfg.lora_targets), bias="none"), self.body)
        for name, p in self.body.named_parameters():  # only the adapters learn
            p.requires_grad_("lora_" in name)

    def lm_head(self, h: Tensor) -> Tensor:
        return F.linear(h, self.tok_embed.weight) if self.tied else self.head(h)  # (..., d) -> (..., V)

    def add_pos(self, emb: Tensor, pos: Tensor) -> Tensor:
        return emb  # rotary: positions are applied inside the blocks (``run``'s pos)

    def prefix(self, p16: Tensor | None, texts: list[tuple[Tensor, Tensor]]):
        return text_prefix(self, p16, texts)

    def step(self, tokens: Tensor, pos: Tensor, seg: Tensor, past: dict) -> tuple[Tensor, dict]:
        """One greedy step: tokens (B,) at text positions pos (B,) -> logits (B, V), the cache."""
        x = self.tok_embed(tokens)[:, None]  # (B, 1, d)
        hid, cache = self.run(x, seg, torch.ones(seg.shape, dtype=torch.bool, device=seg.device), pos[:, None], past)
        return self.lm_head(hid[:, -1]), cache

    def run(self, x: Tensor, seg: Tensor, valid: Tensor, pos: Tensor | None = None,
            past: dict | None = None) -> tuple[Tensor, dict]:
        """The base's blocks over x (B, L, d) at text positions pos (B, L), with the segment mask
        and, after ``past``, its cached keys. Returns the final hidden states and the cache."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(past["kv"] if past is not None else []):
            cache.update(k, v, i)
        if pos is None:
            pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        mask = additive_mask(seg, valid, past, x.dtype)  # (B, 1, L, L_past + L)
        out = self.body(inputs_embeds=x, attention_mask=mask, position_ids=pos + self.grid * self.grid,
                        cache=cache, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in cache.layers]  # (B, kv_heads, L_past + L, dh) each
        return out.last_hidden_state, extend_cache(kv, seg, valid, past)

    def merged_state(self, state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """``state`` (the student's) with every LoRA adapter folded into its base weight, under the
        names a model without adapters has: what is saved."""
        from peft.tuners.lora import LoraLayer

        for name, module in self.body.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            key = f"{prefix}body.{name}"
            base = state.pop(f"{key}.base_layer.weight")
            with torch.no_grad():
                state[f"{key}.weight"] = base + module.get_delta_weight(ADAPTER).detach().to(base.device, base.dtype)
            if f"{key}.base_layer.bias" in state:
                state[f"{key}.bias"] = state.pop(f"{key}.base_layer.bias")
            for k in [k for k in state if k.startswith(f"{key}.lora_")]:
                del state[k]
        return state

    def save_base_config(self, folder: Path) -> None:
        """The base's architecture config (config.json) in ``folder/text_base``: a saved student
        rebuilds its text side from it, offline, without the original base folder."""
        self.config.save_pretrained(str(folder / BASE_DIR))
