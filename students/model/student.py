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

The vision side is ``vision.py``'s (built-in, or a named timm / torchvision backbone:
``backbones.py``), the text side ``text.py``'s (built-in) or ``text_base.py``'s (a pretrained
causal LM, its config saved in ``text_base/``, LoRA merged): docs/pretrained.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distillery.students.model.config import StudentConfig
from distillery.students.model.schema import StudentSchema, load_tokenizer
from distillery.students.model.decoding import answer_limit, greedy_decode
from distillery.students.model.heads import Features, head_class
from distillery.students.model.losses import LossBalancer
from distillery.students.model.text import TextDecoder
from distillery.students.model.vision import build_vision

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


# ---------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------

class MultimodalStudent(nn.Module):
    echoes = True  # the trainer may run text-only steps: forward(batch, echo=True)

    def __init__(self, cfg: StudentConfig, schema: StudentSchema, *, load_weights: bool = True,
                 text_base_dir: str | Path | None = None, lora: bool = True):
        """``load_weights``: read the pretrained parts' weights (``vision_weights``, ``text_base``);
        a saved student (``from_pretrained``) builds the architectures only, from
        ``text_base_dir`` (its own copy of the base's config), without adapters (merged)."""
        super().__init__()
        self.tokenizer, self.fused = None, False
        need_p4 = any("p4" in head_class(n["type"]).feature_maps(n) for n in schema.nodes.values())
        self.vision = build_vision(cfg, need_p4, load_weights)
        decoder = None
        if cfg.text_base is not None:  # its width is the heads' d_model
            from distillery.students.model.text_base import PretrainedTextDecoder

            decoder = PretrainedTextDecoder(cfg, schema.vocab_size, cfg.vision_widths[3],
                                            str(text_base_dir or cfg.text_base), load_weights, lora)
            cfg = cfg.model_copy(update={"d_model": int(decoder.config.hidden_size)})
        self.cfg, self.schema = cfg, schema
        self.heads = nn.ModuleDict({name: head_class(node["type"])(name, node, cfg)
                                    for name, node in schema.nodes.items()})
        summary_tokens = sum(head.prefix_len() for head in self.heads.values())
        self.decoder = decoder or TextDecoder(cfg, schema.vocab_size, cfg.vision_widths[3], summary_tokens)
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
        prefix, valid, n_q, prefix_pos = self.decoder.prefix(feats.maps["p16"], texts)
        segs = [s for head in self.heads.values() for s in head.segments(batch, self.decoder.tok_embed, echo)]
        parts, seg_ids, valids, starts = [prefix], [torch.zeros_like(valid, dtype=torch.long)], [valid], []
        positions = [prefix_pos]
        start = prefix.shape[1]
        for i, s in enumerate(segs, start=1):
            L = s.embeds.shape[1]
            pos = n_q[:, None] + torch.arange(L, device=n_q.device)  # (B, L): every segment follows the question
            parts.append(self.decoder.add_pos(s.embeds, pos))
            positions.append(pos)
            seg_ids.append(torch.full(s.valid.shape, i, dtype=torch.long, device=n_q.device))
            valids.append(s.valid)
            starts.append(start)
            start += L
        hidden, cache = self.decoder.run(torch.cat(parts, 1), torch.cat(seg_ids, 1), torch.cat(valids, 1),
                                         torch.cat(positions, 1))
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
                    and type(module[1]) is nn.BatchNorm2d:  # (not a subclass that also activates: timm's)
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
            state = dict(self.state_dict())
            if hasattr(self.decoder, "merged_state"):  # a text base: adapters merged, its config kept
                state = self.decoder.merged_state(state, "decoder.")
                self.decoder.save_base_config(tmp)
            state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
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
        base = model_dir / "text_base" if cfg.text_base is not None else None
        if base is not None and not (base / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{model_dir}: a student with a text_base but no text_base/{CONFIG_FILE}")
        model = cls(cfg, schema, load_weights=False, text_base_dir=base, lora=False)
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
        if f.is_dir() and (out_dir / f.name).is_dir():  # (text_base/: an older copy goes first)
            shutil.rmtree(out_dir / f.name)
        os.replace(f, out_dir / f.name)
