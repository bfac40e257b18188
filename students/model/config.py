"""Typed config for the student model: sizes, loss weights, distillation and inference settings.

Every field is a spec key under ``student:``; the Prefect UI renders them as a form. The defaults
make a ~1.3M-parameter student (vision encoder 0.5M, text decoder 0.65M + the vocabulary's
embeddings, heads ~0.1M) that reads a 128 px image and a short question.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StudentConfig(BaseModel):
    """Sizes of the multimodal student, how its losses are weighted, and how it decodes."""

    model_config = ConfigDict(extra="forbid")

    # -- vision encoder ---------------------------------------------------------------------------
    image_size: int = Field(128, ge=32, description="Square input size of the vision encoder "
                            "(images are resized to it, aspect ratio not kept; a multiple of 16).")
    downscale: Literal["reduce", "bilinear"] = Field(
        "reduce", description="How an image is brought to image_size: 'reduce' (a box filter by the "
        "integer factor first, then bilinear: PIL's reducing_gap=1, ~5x faster on the CPU) or "
        "'bilinear' alone (what students saved before this option were trained on).")
    vision_widths: tuple[int, int, int, int] = Field(
        (16, 32, 64, 128), description="Channels of the conv stages at strides 2, 4, 8 and 16.")
    vision_act: Literal["silu", "relu"] = Field(
        "silu", description="The conv layers' activation. 'relu' is the quantization-friendly choice "
        "(as EfficientNet-Lite and MobileNet replaced swish for int8): int8 folds it into each "
        "convolution, where SiLU runs in float between a dequantize and a quantize; measured in "
        "benchmarks/scale.py's student: its 640-px int8 vision graph about half the cost.")
    vision_stem: Literal["conv", "patchify"] = Field(
        "conv", description="How the built-in encoder gets to stride 4: 'conv', a stride-2 3x3 "
        "convolution to vision_widths[0] channels, then a stride-2 one to vision_widths[1]; "
        "'patchify' (ConvNeXt's stem), one 4x4 stride-4 convolution straight to vision_widths[1] "
        "(vision_widths[0] unused). At large image sizes on CPU the full-size 3-channel convolution "
        "is the costliest layer and runs poorly in int8: benchmarks/vision_encoder.py, 640 px, "
        "patchify's int8 encoder takes 0.77x the time of conv's. At the demo's 128 px it detects "
        "worse (300 steps, benchmarks/pretrained.py --variants today,relu-vision,relu-patchify: "
        "mAP50 0.867 vs 0.915): for large images.")
    image_grid: int = Field(4, ge=1, description="Image tokens per side: the stride-16 features are "
                            "average-pooled to image_grid x image_grid tokens for the text decoder.")
    channels_last: bool = Field(True, description="Run the conv encoder in channels_last memory "
                                "format (faster on CPU and on tensor cores).")
    vision_backbone: str | None = Field(
        None, description="A pretrained backbone in place of the built-in conv encoder: 'timm/<name>' "
        "(e.g. timm/mobilenetv3_small_100) or 'torchvision/<name>' (a model with a 'features' Sequential, "
        "e.g. torchvision/mobilenet_v3_small). Built with pretrained=False; its stride-4/8/16 features are "
        "projected to vision_widths[1:] (docs/pretrained.md).")
    vision_weights: str | None = Field(None, description="The backbone's weights: a local .safetensors / "
                                       ".bin / .pth file, or a folder with model.safetensors or "
                                       "pytorch_model.bin. None: random init. Never downloaded.")
    freeze_vision_backbone: bool = Field(False, description="Keep the backbone's weights and BatchNorm "
                                         "statistics as loaded (the projections and heads still train).")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip of a "
                         "training image (boxes and masks flipped with it). Deterministic per "
                         "(seed, epoch, index): see TraceDataset.set_epoch.")

    # -- text decoder -------------------------------------------------------------------------------
    tokenizer: str | None = Field(None, description="The student's own tokenizer (a local folder, or a "
                                  "hub id already in the local cache). None: the teacher LLM's, so soft labels "
                                  "line up token by token. Another one: the teacher's text is re-tokenized "
                                  "and its stored top-k soft labels count through the universal logit "
                                  "distillation loss (sorted probabilities, aligned by position; "
                                  "docs/cross-tokenizer.md).")
    text_base: str | None = Field(
        None, description="A small causal LM as the text side (a local folder, or a hub id already in the "
        "local cache; e.g. a SmolLM2-135M- or Qwen2.5-0.5B-shaped model): its blocks, embeddings and "
        "tokenizer replace the built-in decoder (then d_model, n_layers, n_heads, mlp_ratio and dropout "
        "come from its config, and tokenizer defaults to its own). docs/pretrained.md.")
    freeze_text_layers: int = Field(0, ge=0, description="text_base: keep its token embeddings and its "
                                    "first N blocks as loaded.")
    lora_rank: int = Field(0, ge=0, description="text_base: LoRA adapters of this rank (peft) on "
                           "lora_targets, the base's own weights frozen; 0: full fine-tuning. Merged "
                           "into the weights when the student is saved.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (scale = alpha / rank).")
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                    description="Names of the text base's linear layers that get LoRA adapters.")
    d_model: int = Field(128, ge=16, description="Width of the text decoder.")
    n_layers: int = Field(3, ge=1, description="Transformer blocks in the text decoder.")
    n_heads: int = Field(4, ge=1, description="Attention heads per block (must divide d_model).")
    mlp_ratio: int = Field(4, ge=1, description="MLP hidden width = mlp_ratio * d_model.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in the text decoder, on its "
                           "residual branches (attention output, MLP); none on the attention probabilities.")
    max_question_tokens: int = Field(32, ge=1, description="Questions are cut to this many tokens.")
    max_answer_tokens: int = Field(16, ge=1, description="Longest answer (targets are cut; "
                                   "greedy decoding stops here), eos included.")
    max_rationale_tokens: int = Field(128, ge=1, description="Rationale targets (the teacher's "
                                      "whole generated text) are cut to this many tokens.")

    # -- heads ---------------------------------------------------------------------------------------
    det_width: int = Field(64, ge=8, description="Channels of the detection head's conv tower.")
    num_prototypes: int = Field(16, ge=1, description="Prototype masks (segmentation nodes).")
    detection_summary: Literal["slots", "text", "none"] = Field(
        "slots", description="What each detection head puts in the text decoder's prefix: 'slots', "
        "one token per class (the class name's embedding + its count's + count x a learned vector, "
        "so sums and comparisons of counts are linear); 'text', the summary the teacher LLM read "
        "(\"blue square x1, red circle x2\"); 'none'. The counts are the teacher's in training, "
        "the head's own at inference.")
    max_summary_tokens: int = Field(48, ge=1, description="'text' summaries are cut to this many tokens.")
    max_count: int = Field(20, ge=1, description="'slots': counts above this share its number token.")
    det_center_radius: float = Field(1.5, gt=0, description="Box regression positives (FCOS center "
                                     "sampling): locations inside a box within this many strides of "
                                     "its center.")

    # -- loss weights ---------------------------------------------------------------------------------
    loss_weights: dict[str, float] = Field(default_factory=dict, description="Weight per teacher "
                                           "node name (missing nodes: 1.0).")
    auto_balance: bool = Field(False, description="Divide each node's loss by a running mean of its "
                               "own magnitude before weighting, so nodes whose losses differ by "
                               "orders of magnitude contribute alike.")
    balance_momentum: float = Field(0.99, ge=0.0, lt=1.0, description="EMA momentum of auto_balance.")
    box_weight: float = Field(2.0, ge=0.0, description="GIoU box loss weight inside a detection node.")
    mask_weight: float = Field(1.0, ge=0.0, description="Mask loss weight inside a segmentation node.")

    # -- distillation -----------------------------------------------------------------------------------
    kd_temperature: float = Field(2.0, gt=0.0, description="Temperature T of token-level KD "
                                  "(the KL is scaled by T^2, Hinton et al. 2015).")
    kd_alpha: float = Field(0.5, ge=0.0, le=1.0, description="Share of the KD term in the text "
                            "loss; 1 - alpha goes to cross-entropy on the teacher's tokens.")
    kd_kind: Literal["forward", "reverse", "jsd"] = Field("forward", description="Divergence of "
                                                          "token-level KD.")
    kd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="Mixture weight of the JSD kind.")
    rationale_weight: float = Field(0.5, ge=0.0, description="Weight of the rationale task "
                                    "(distilling step by step) relative to the answer task.")
    retrieval_temperature: float = Field(0.05, gt=0.0, description="Teacher retrieval scores "
                                         "(cosine similarities) are softmaxed at this temperature.")
    retrieval_ce_weight: float = Field(0.5, ge=0.0, description="Weight of cross-entropy on the "
                                       "teacher's top-1 document next to the KL.")

    # -- inference ------------------------------------------------------------------------------------------
    det_conf: float | None = Field(None, ge=0.0, le=1.0, description="Detection score threshold; "
                                   "None: the teacher node's conf.")
    det_iou: float | None = Field(None, ge=0.0, le=1.0, description="NMS IoU threshold; None: the "
                                  "teacher node's iou.")
    max_det: int | None = Field(None, ge=1, description="Most detections per image; None: the "
                                "teacher node's max_det.")

    @field_validator("detection_summary", mode="before")
    @classmethod
    def _summary_from_bool(cls, v):  # students saved before 'slots' existed: true / false
        return {True: "text", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _sizes_fit(self) -> "StudentConfig":
        if self.image_size % 16:
            raise ValueError(f"image_size {self.image_size}: must be a multiple of 16 (the encoder's stride)")
        if self.text_base is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.vision_stem != "conv" and self.vision_backbone is not None:
            raise ValueError(f"vision_stem {self.vision_stem!r} shapes the built-in encoder, and vision_backbone "
                             f"{self.vision_backbone!r} replaces it: set one or the other")
        if self.vision_weights is not None and self.vision_backbone is None:
            raise ValueError("vision_weights is set but vision_backbone is not (which network do they fit?)")
        if self.vision_backbone is not None and self.vision_backbone.partition("/")[0] not in ("timm", "torchvision"):
            raise ValueError(f"vision_backbone {self.vision_backbone!r}: expected 'timm/<name>' or 'torchvision/<name>'")
        if self.text_base is None and (self.lora_rank or self.freeze_text_layers):
            raise ValueError("lora_rank / freeze_text_layers apply to a text_base, and text_base is not set")
        if self.image_grid > self.image_size // 16:
            raise ValueError(f"image_grid {self.image_grid} exceeds the stride-16 grid "
                             f"({self.image_size // 16} for image_size {self.image_size})")
        return self

    def weight(self, node: str) -> float:
        return float(self.loss_weights.get(node, 1.0))
