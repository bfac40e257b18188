"""The student: one small multimodal model with a head per teacher node.

    image (B, 3, S, S) -> VisionEncoder -> p4, p8, p16 (strides 4, 8, 16)
                            p8, p4 -> DetectionHead -> boxes, classes, masks
                                        '-> its counts per class, as one slot token per class
                            p16 pooled to g x g image tokens
    TextDecoder over [image tokens | class slots | question | segments]
        segments: a retrieval query token (RetrievalHead), [answer] + answer and [rationale] +
        rationale (AnswerHead: distilling step by step)

The prefix (image tokens, slots, question) attends to itself both ways; every segment attends to
the prefix and causally to itself, never to another segment, so one pass trains every task and
at inference [answer] sees what it saw in training. The counts in the slots are the teacher's
detections in training and the head's own at inference (``StudentConfig.detection_summary``;
'text' puts the summary the teacher LLM read there instead). Because the decoder is cheap and the
vision encoder is not, training can add text-only steps on fresh batches
(``TrainConfig.text_echo``, ``forward(batch, echo=True)``). Saved as ``model.safetensors`` +
``config.json`` (config + schema) + the tokenizer files; loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distillery.students.model.config import StudentConfig
from distillery.students.model.schema import StudentSchema, load_tokenizer
from distillery.students.model.decoding import answer_limit, greedy_decode
from distillery.students.model.heads import Features, conv_bn_act, head_class
from distillery.students.model.losses import LossBalancer

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


# ---------------------------------------------------------------------------------------------
# Vision: a few conv stages and a light top-down fusion
# ---------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_act(c, c), conv_bn_act(c, c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class VisionEncoder(nn.Module):
    """Stem (stride 2) and three stages (strides 4, 8, 16); p8 and p4 get the coarser level added
    (FPN-style, Lin et al. 2017). ``need_p4``: only segmentation heads read stride 4."""

    def __init__(self, widths: tuple[int, int, int, int], need_p4: bool):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = conv_bn_act(3, w0, 3, 2)
        self.s4 = nn.Sequential(conv_bn_act(w0, w1, 3, 2), ResBlock(w1))
        self.s8 = nn.Sequential(conv_bn_act(w1, w2, 3, 2), ResBlock(w2))
        self.s16 = nn.Sequential(conv_bn_act(w2, w3, 3, 2), ResBlock(w3))
        self.lat16 = nn.Conv2d(w3, w2, 1)
        self.lat8 = nn.Conv2d(w2, w1, 1) if need_p4 else None

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        c4 = self.s4(self.stem(images))  # (B, w1, S/4, S/4)
        c8 = self.s8(c4)  # (B, w2, S/8, S/8)
        p16 = self.s16(c8)  # (B, w3, S/16, S/16)
        p8 = c8 + F.interpolate(self.lat16(p16), scale_factor=2.0, mode="nearest")
        maps = {"p8": p8, "p16": p16}
        if self.lat8 is not None:
            maps["p4"] = c4 + F.interpolate(self.lat8(p8), scale_factor=2.0, mode="nearest")
        return maps


# ---------------------------------------------------------------------------------------------
# Text: a small pre-LN transformer with a key/value cache for greedy decoding
# ---------------------------------------------------------------------------------------------

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

    def prefix(self, p16: Tensor | None, texts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """[image tokens | text] embeddings (B, Li + Lt, d) and validity, where the text is the
        concatenation of ``texts`` (embeddings (B, L, d), validity (B, L)): what the detection
        heads put there, then the question. ``p16`` None: no image tokens (a text-only step).
        Also returns the number of text tokens (B,), where every segment's positions start."""
        emb, mask = torch.cat([t[0] for t in texts], 1), torch.cat([t[1] for t in texts], 1)  # (B, Lt, d), (B, Lt)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, Lt): padding does not shift positions
        text = emb + self.text_pos(pos)
        if p16 is None:
            return text, mask, mask.sum(1)
        img = F.adaptive_avg_pool2d(p16, self.grid).flatten(2).transpose(1, 2)  # (B, g*g, C16)
        img = self.img_proj(img) + self.img_pos  # (B, g*g, d)
        ones = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
        return torch.cat([img, text], 1), torch.cat([ones, mask], 1), mask.sum(1)

    def step(self, tokens: Tensor, pos: Tensor, seg: Tensor, past: dict) -> tuple[Tensor, dict]:
        """One greedy step: tokens (B,) at text positions pos (B,) in segment seg (B, 1), after
        the cache ``past`` -> next-token logits (B, V) and the extended cache."""
        x = (self.tok_embed(tokens) + self.text_pos(pos))[:, None]  # (B, 1, d)
        hid, cache = self.run(x, seg, torch.ones(seg.shape, dtype=torch.bool, device=seg.device), past=past)
        return self.lm_head(hid[:, -1]), cache

    def run(self, x: Tensor, seg: Tensor, valid: Tensor, past: dict | None = None) -> tuple[Tensor, dict]:
        """Blocks over x (B, L, d) with segment ids seg (B, L) and validity (B, L). With ``past``
        (an earlier call's cache) the new tokens also see the cached keys of the prefix and of
        their own segment. Returns the final hidden states (B, L, d) and the extended cache."""
        mask = segment_mask(seg, valid)  # (B, 1, L, L)
        if past is not None:
            ks = past["seg"][:, None, :]  # (B, 1, L_past)
            old = ((ks == 0) | (ks == seg[:, :, None])) & past["valid"][:, None, :]  # (B, L, L_past)
            mask = torch.cat([old[:, None], mask], -1)  # (B, 1, L, L_past + L)
        # additive float mask, built once per call (a bool mask is converted in every layer)
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block(x, mask, past["kv"][i] if past is not None else None)
            kv.append(layer_kv)
        cache = {"kv": kv,
                 "seg": seg if past is None else torch.cat([past["seg"], seg], 1),
                 "valid": valid if past is None else torch.cat([past["valid"], valid], 1)}
        return self.ln_f(x), cache


# ---------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------

class MultimodalStudent(nn.Module):
    echoes = True  # the trainer may run text-only steps: forward(batch, echo=True)

    def __init__(self, cfg: StudentConfig, schema: StudentSchema):
        super().__init__()
        self.cfg, self.schema, self.tokenizer, self.fused = cfg, schema, None, False
        need_p4 = any("p4" in head_class(n["type"]).feature_maps(n) for n in schema.nodes.values())
        self.vision = VisionEncoder(cfg.vision_widths, need_p4)
        self.heads = nn.ModuleDict({name: head_class(node["type"])(name, node, cfg)
                                    for name, node in schema.nodes.items()})
        summary_tokens = sum(head.prefix_len() for head in self.heads.values())
        self.decoder = TextDecoder(cfg, schema.vocab_size, cfg.vision_widths[3], summary_tokens)
        self.balancer = LossBalancer(list(schema.nodes), cfg.balance_momentum)
        if cfg.channels_last:
            self.vision.to(memory_format=torch.channels_last)
            self.heads.to(memory_format=torch.channels_last)

    def text_tokenizer(self):
        """The tokenizer of the text side (loaded from the schema once)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.schema)
        return self.tokenizer

    # -- forward ----------------------------------------------------------------------------------
    def encode(self, batch: dict) -> tuple[dict, Features, dict]:
        """Vision, the heads that read only the conv features (detection), then one decoder pass
        over [image tokens | what those heads put there | question | every text head's segments].
        Returns those heads' outputs, the features and the decoding state."""
        outputs, feats = self.encode_vision(batch)
        return outputs, feats, self.encode_text(batch, outputs, feats)

    def encode_vision(self, batch: dict) -> tuple[dict, Features]:
        """The conv pyramid and the outputs of the heads that read it alone."""
        images = batch["images"]
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = Features(self.vision(x), lm_head=self.decoder.lm_head)
        return {name: head(feats) for name, head in self.heads.items() if not head.reads_text}, feats

    def encode_text(self, batch: dict, outputs: dict, feats: Features, echo: bool = False) -> dict:
        """One decoder pass; fills ``feats.text`` (segment name -> hidden states) and returns the
        decoding state (key/value cache, where each segment starts)."""
        targets = batch.get("targets", {})
        texts = []
        for name, head in self.heads.items():
            if not head.reads_text:
                text = head.prefix_embeds(outputs[name], targets.get(name), self.text_tokenizer(),
                                          self.decoder.tok_embed)
                texts += [text] if text is not None else []
        texts.append((self.decoder.tok_embed(batch["question_ids"]), batch["question_mask"]))
        prefix, valid, n_q = self.decoder.prefix(feats.maps["p16"], texts)
        segs = [s for head in self.heads.values() for s in head.segments(batch, self.decoder.tok_embed, echo)]
        parts, seg_ids, valids, starts = [prefix], [torch.zeros_like(valid, dtype=torch.long)], [valid], []
        start = prefix.shape[1]
        for i, s in enumerate(segs, start=1):
            L = s.embeds.shape[1]
            pos = n_q[:, None] + torch.arange(L, device=n_q.device)  # (B, L): every segment follows the question
            parts.append(s.embeds + self.decoder.text_pos(pos))
            seg_ids.append(torch.full(s.valid.shape, i, dtype=torch.long, device=n_q.device))
            valids.append(s.valid)
            starts.append(start)
            start += L
        hidden, cache = self.decoder.run(torch.cat(parts, 1), torch.cat(seg_ids, 1), torch.cat(valids, 1))
        # Each segment's states, sliced from the end: its length is static, where it starts depends
        # on the question's length (a dynamic axis of the ONNX export, students/onnx.py).
        feats.text, end = {}, 0
        for s in reversed(segs):
            L = int(s.embeds.shape[1])
            feats.text[s.name] = hidden[:, -(end + L): (-end or None)]
            end += L
        return {"cache": cache, "n_q": n_q, "segments": segs, "starts": starts, "hidden": hidden}

    def forward(self, batch: dict, echo: bool = False) -> dict[str, dict[str, Tensor]]:
        """Every head's raw outputs from one pass: {node: {output: tensor}}. ``echo``: a text-only
        step (``TrainConfig.text_echo``): no vision encoder and no image tokens, the conv heads'
        outputs empty (their prefix comes from the teacher's detections in the
        targets), no auxiliary rationale; only the heads that read text return outputs."""
        if echo:
            B, device = batch["question_ids"].shape[0], batch["question_ids"].device
            feats = Features({"p16": None}, lm_head=self.decoder.lm_head)
            outputs = {name: head.empty_outputs(B, device) for name, head in self.heads.items() if not head.reads_text}
            self.encode_text(batch, outputs, feats, echo=True)
            return {name: head(feats) for name, head in self.heads.items() if head.reads_text}
        outputs, feats, _ = self.encode(batch)
        return outputs | {name: head(feats) for name, head in self.heads.items() if head.reads_text}

    def loss(self, batch: dict, outputs: dict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total = sum over nodes of weight * (balanced) node loss; per-node losses detached.
        Nodes absent from ``outputs`` (an echo step's) add nothing."""
        outputs = outputs if outputs is not None else self(batch)
        per_node = {name: head.loss(outputs[name], batch["targets"][name]) for name, head in self.heads.items()
                    if name in outputs}
        scaled = self.balancer(per_node) if self.cfg.auto_balance else per_node
        total = sum(self.cfg.weight(name) * v for name, v in scaled.items())
        return total, {name: v.detach() for name, v in per_node.items()}

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_raw(self, batch: dict, max_new_tokens: int | None = None) -> dict[str, dict]:
        """Every head's outputs for a batch without targets; generative heads also get
        ``answer_ids`` (one token-id list per input, eos cut) by greedy decoding of [answer]."""
        outputs, feats, state = self.encode(batch)
        outputs |= {name: head(feats) for name, head in self.heads.items() if head.reads_text}
        for index, seg in enumerate(state["segments"], start=1):
            name = seg.name.split("/")[0]
            if self.heads[name].generative:
                outputs[name]["answer_ids"] = self.greedy(state, index, max_new_tokens)
        return outputs

    def greedy(self, state: dict, index: int, max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy decoding after segment ``index`` (its task token) with the key/value cache;
        a row stops at an eos id, every row at the length limit."""
        seg, start = state["segments"][index - 1], state["starts"][index - 1]
        L = seg.embeds.shape[1]
        h, cache = state["hidden"][:, start + L - 1], state["cache"]  # (B, d): the task token's state
        seg_ids = torch.full((h.shape[0], 1), index, device=h.device)

        def step(tokens: Tensor, pos: Tensor) -> Tensor:
            nonlocal cache
            logits, cache = self.decoder.step(tokens, pos, seg_ids, cache)
            return logits

        return greedy_decode(self.decoder.lm_head(h), step, state["n_q"] + L, self.schema.text["eos_ids"],
                             answer_limit(self.cfg, max_new_tokens))

    @torch.no_grad()
    def fuse_for_inference(self) -> "MultimodalStudent":
        """Fold every BatchNorm into its conv (eval mode only; the weights no longer match a
        saved student's, so fuse a loaded copy, never the model being trained)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        for module in self.modules():
            if isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(module[0], nn.Conv2d) \
                    and isinstance(module[1], nn.BatchNorm2d):
                module[0], module[1] = fuse_conv_bn_eval(module[0], module[1]), nn.Identity()
        if self.cfg.channels_last:
            self.vision.to(memory_format=torch.channels_last)
            self.heads.to(memory_format=torch.channels_last)
        self.fused = True
        return self

    # -- saving -------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """model.safetensors + config.json (config + schema) + tokenizer files, written to a
        temporary folder next to ``out_dir`` and moved into place (a crash leaves no half
        student). Other files already in ``out_dir`` (metrics, checkpoints) are kept."""
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            config = {"student": self.cfg.model_dump(mode="json"), "schema": self.schema.to_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            self.text_tokenizer().save_pretrained(str(tmp))
            _move_into(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, map_location: str | torch.device = "cpu") -> "MultimodalStudent":
        """Rebuild from config.json and load model.safetensors (no pickle anywhere)."""
        model_dir = Path(model_dir)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if not (model_dir / f).is_file():
                raise FileNotFoundError(f"{model_dir}: no {f} (not a saved student)")
        config = json.loads((model_dir / CONFIG_FILE).read_text())
        config["student"].setdefault("downscale", "bilinear")  # saved before the option: trained so
        cfg = StudentConfig.model_validate(config["student"])
        schema = StudentSchema.from_dict(config["schema"])
        schema.tokenizer = str(model_dir)
        model = cls(cfg, schema)
        model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE), device=str(map_location)))
        model.tokenizer = load_tokenizer(schema)
        return model.to(map_location).eval()


def _move_into(tmp: Path, out_dir: Path) -> None:
    """Replace the student's files in out_dir by tmp's: a fresh out_dir is one rename; an
    existing one gets each file by an atomic os.replace (the weights last)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    files = sorted(tmp.iterdir(), key=lambda p: p.name == WEIGHTS_FILE)
    for f in files:
        os.replace(f, out_dir / f.name)
