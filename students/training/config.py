"""Typed config for training the student (owned by the trainer work).

Every field is a spec key under ``training:``; the Prefect UI renders them as a form.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OnPolicyConfig(BaseModel):
    """On-policy distillation after the offline epochs (GKD, Agarwal et al. 2024; MiniLLM, Gu et al.
    2024): in each round the student answers a sample of training inputs, the white-box teacher
    LLM node scores those answers token by token (its top-k log-probs on the student's own tokens,
    given the same prompt and upstream outputs), and the student trains on that signal, mixed with
    offline batches. Spec key ``training.on_policy``; see docs/onpolicy.md."""


    enabled: bool = Field(False, description="Run the on-policy rounds after the offline epochs.")
    rounds: int = Field(3, ge=1, description="Rounds of (student answers -> teacher scores -> train).")
    samples_per_round: int = Field(64, ge=1, description="Training inputs the student answers each round "
                                   "(drawn anew each round, seeded by (seed, round)).")
    steps_per_round: int = Field(20, ge=1, description="Optimizer steps each round.")
    gkd_lambda: float = Field(0.5, ge=0.0, le=1.0, description="Share of the round's steps "
                         "taken on the student's scored answers (the rest on offline batches), as GKD's "
                         "lambda; 1: on-policy only.")
    kind: Literal["forward", "reverse", "jsd"] = Field("jsd", description="Divergence on the student's "
                                                         "tokens: forward KL(teacher||student), reverse "
                                                         "KL (MiniLLM) or the generalized JSD (GKD).")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="Mixture weight of the generalized JSD.")
    temperature: float = Field(1.0, gt=0.0, description="Temperature of the divergence on on-policy "
                               "batches (1: the teacher's own distribution).")
    lr: float = Field(1e-4, gt=0, description="Constant learning rate of the on-policy steps (the offline "
                      "schedule has decayed by then).")
    decoding: Literal["greedy", "sample"] = Field("greedy", description="How the student answers: greedy "
                                                   "(what it serves) or sampled at `sample_temperature`.")
    sample_temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (decoding: sample).")
    node: str | None = Field(None, description="The teacher LLM node that scores (default: the graph's "
                             "only `llm` node, else its only `openai` node).")

    model_config = ConfigDict(extra="forbid")


class TrainConfig(BaseModel):
    """How the student is trained: optimisation, schedule, checkpoints, devices, data split."""

    model_config = ConfigDict(extra="forbid")

    # -- length ---------------------------------------------------------------------------------
    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps "
                                  "(caps `epochs`; the schedule is built for the capped length).")
    batch_size: int = Field(16, ge=1, description="Records per optimizer step on each process.")

    # -- optimiser (AdamW + linear warmup then cosine decay) ----------------------------------------
    lr: float = Field(3e-4, gt=0, description="Peak learning rate after warmup.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps before the cosine decay.")
    text_echo: int = Field(0, ge=0, description="Text-only steps after each full step (in the spirit "
                           "of data echoing, Choi et al. 2019: the text decoder is cheap, the vision "
                           "encoder is not): each draws a fresh batch at random from the training "
                           "split and trains the text heads on it with no image tokens and the "
                           "teacher's detections in the prefix. The learning rate stays the step's. "
                           "For graphs whose answers come from the detections, not the pixels. 0: off.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global grad norm to this "
                                    "(None: no clipping).")

    # -- checkpoints --------------------------------------------------------------------------------
    checkpoint_every: int = Field(200, ge=1, description="Write a resumable checkpoint every N "
                                  "optimizer steps (and always at the last step).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")

    # -- data ----------------------------------------------------------------------------------------
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of distinct IMAGES held "
                                "out for validation (split by a hash of the image bytes).")
    replay_fraction: float = Field(0.25, ge=0.0, le=1.0, description="Continual runs: share of the "
                                   "training mix drawn from older records (n_old = f / (1 - f) * n_new; "
                                   "1: all of them); see students.continual.replay_sample.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the "
                             "training process; exact resume holds for any value when the "
                             "dataset is deterministic).")
    agreement_every: int = Field(1, ge=0, description="Measure agreement with the teacher on the "
                                 "validation split every N epochs (0: only after the last epoch).")

    # -- devices ----------------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available. "
                                                    "Under torchrun each process takes cuda:LOCAL_RANK.")
    amp: bool = Field(True, description="Mixed precision on CUDA (bf16 where supported, else fp16 "
                      "with a GradScaler). Ignored on CPU.")
    deterministic: bool = Field(True, description="Use deterministic kernels (torch."
                                "use_deterministic_algorithms, warn-only): two runs with the same seed "
                                "- or a run and its interrupted-and-resumed twin - end with identical "
                                "weights. Off: a little faster, equal only up to float noise.")
    seed: int = Field(0, description="Seeds weights, data order and dropout; the same seed gives "
                      "the same weights, with or without an interruption and resume.")
    nproc_per_node: int = Field(1, ge=1, description="Training processes on each machine (one per GPU): "
                                "above 1, or with more than one node, the trainer is launched through "
                                "torchrun (torch.distributed.run): nccl on GPUs, gloo on CPU.")
    nnodes: str = Field("1", pattern=r"^\d+(:\d+)?$", description="Machines in the run, N or MIN:MAX "
                        "(elastic); each runs the same command. Above 1 needs `rdzv_endpoint`.")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous every node joins "
                                      "(a port on the first node); None: this machine alone (standalone).")
    max_restarts: int = Field(0, ge=0, description="torchrun restarts of the whole group after a process "
                              "fails; each restart resumes from the latest checkpoint.")
    onnx_export: bool = Field(True, description="Also write the student as ONNX Runtime graphs "
                              "(onnx/ in the student folder, students/onnx.py): its fast CPU backend.")
    deployment: str | None = Field(None, description="Run the train step as this Prefect deployment "
                                   "(e.g. 'train/gpu' on the gpu work pool, see prefect.yaml); None: "
                                   "in-process. Trace store and output paths must be shared storage.")

    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="On-policy rounds "
                                      "after the offline epochs (off by default; `distillery train --on-policy`).")

    @model_validator(mode="after")
    def _rendezvous(self) -> "TrainConfig":
        if self.nnodes != "1" and not self.rdzv_endpoint:
            raise ValueError(f"nnodes {self.nnodes!r}: a run on several machines needs rdzv_endpoint "
                             "(host:port on the first node, that every node can reach)")
        return self

    @property
    def launched(self) -> bool:
        """Whether training runs as a torchrun process group (several processes or machines)."""
        return self.nproc_per_node > 1 or self.nnodes != "1"
