"""On-policy distillation: rounds after the offline epochs (GKD, Agarwal et al. 2024; MiniLLM, Gu et al.
2024), configured by ``training.on_policy`` (``OnPolicyConfig``).

Offline distillation trains the student on the teacher's own answers; at inference the student
conditions on ITS answers (exposure bias). Each round here:

1. the student answers a sample of training inputs (greedy, or sampled);
2. the teacher LLM node scores each answer token by token, through the graph's code
   (``TeacherGraph.score_node``: the prompt rendered from the record's request and recorded
   upstream outputs), after the teacher's own recorded reasoning: the continuation scored is
   ``<recorded tokens before the answer> + <student answer> + <eos>``, so the teacher's top-k at the
   answer's positions is its distribution over the answer, as in the recorded soft labels;
3. each scored answer becomes an ordinary ``TeacherRecord`` whose llm output holds the student's
   tokens as the target and the teacher's top-k on them as soft labels, so ``TraceDataset`` and
   ``collate`` take it as is (no student change);
4. ``steps_per_round`` optimizer steps, each on-policy with probability ``lambda`` (the [answer]
   task alone, ``onpolicy_loss``: the chosen divergence on the student's tokens, no hard labels),
   else an offline batch (the full loss).

Scores are kept in the trace store (``TraceStore.scores``, keyed by round, input id, answer hash,
graph fingerprint and node), and a checkpoint is written after each round: a killed run resumes
from its last round, and a round it replays finds its answers' scores in the store.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from distillery.students.model import losses
from distillery.students.model.heads.llm import answer_start
from distillery.students.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from distillery.students.training.config import OnPolicyConfig
from distillery.teachers.records import Request, ScoreRecord, TeacherRecord, answer_hash

CHECKPOINTS = "checkpoints_onpolicy"  # beside the offline checkpoints in the student's out_dir


@dataclass
class OnPolicySummary:
    """What the on-policy phase did (``metrics.json`` -> ``on_policy``)."""

    node: str
    rounds: int = 0  # rounds done
    answered: int = 0  # student answers produced
    scored: int = 0  # answers that became training records
    skipped: int = 0  # answers left out, ``skipped_why``: {reason: count} (see ``continuation``)
    skipped_why: dict[str, int] = field(default_factory=dict)
    teacher_calls: int = 0  # continuations the teacher scored in this phase
    teacher_seconds: float = 0.0
    cached: int = 0  # continuations whose scores came from the store (no teacher call)
    steps: int = 0
    on_policy_steps: int = 0
    seconds: float = 0.0
    per_round: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The loss: a pure function of the student's logits and the collated on-policy target
# ---------------------------------------------------------------------------------------------

def onpolicy_loss(answer_logits: Tensor, target: dict[str, Tensor], cfg: OnPolicyConfig) -> Tensor:
    """Mean per-token divergence between the teacher's top-k (stored on the student's own answer
    tokens) and the student, ``cfg.kind`` at ``cfg.temperature`` (GKD's generalized JSD with
    ``cfg.beta``, reverse KL as MiniLLM, or forward KL). No hard-label term: the tokens are the
    student's own. answer_logits (B, L, V); target: the llm head's collated answer fields."""
    mask = target["answer_mask"] & target["mask"][:, None]  # (B, L)
    return losses.distill_loss(answer_logits, target["answer_ids"], mask, target["answer_topk_ids"],
                               target["answer_topk_logprobs"], target["answer_kd_mask"],
                               temperature=cfg.temperature, alpha=1.0, kind=cfg.kind, beta=cfg.beta)


# ---------------------------------------------------------------------------------------------
# Student answers -> continuations -> records
# ---------------------------------------------------------------------------------------------

def scoring_node(teachers: dict, cfg: OnPolicyConfig) -> str:
    """The node that scores: ``cfg.node``, else the graph's only ``llm`` node, else its only ``openai``."""
    if cfg.node is not None:
        if cfg.node not in teachers or teachers[cfg.node].type not in ("llm", "openai"):
            raise ValueError(f"training.on_policy.node {cfg.node!r}: not an llm or openai node of the graph "
                             f"(nodes: {', '.join(teachers)})")
        return cfg.node
    for kind in ("llm", "openai"):
        found = [n for n, c in teachers.items() if c.type == kind]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"training.on_policy: the graph has several {kind} nodes ({', '.join(found)}): "
                             "name the one that scores in training.on_policy.node")
    raise ValueError("training.on_policy: the graph has no llm or openai node to score the student's answers")


def pick_inputs(records: Sequence[TeacherRecord], node: str, n: int, seed: int, round_: int) -> list[TeacherRecord]:
    """``n`` training records with a usable output of ``node`` (token ids, a non-empty answer, not
    truncated: what the offline answer target needs too), drawn by (seed, round) alone."""
    def usable_output(out) -> bool:
        return isinstance(out, dict) and len(out.get("token_ids", [])) > 0 and not out.get("truncated") \
            and bool(str(out.get("answer", "")).strip())

    usable = [r for r in records if node not in r.errors and usable_output(r.outputs.get(node)) and r.image_bytes]
    rng = np.random.default_rng([seed, round_, 7])
    picks = rng.permutation(len(usable))[:n]
    return [usable[i] for i in sorted(picks)]


@torch.no_grad()
def student_answers(model, records: Sequence[TeacherRecord], node: str, cfg: OnPolicyConfig, seed: int,
                    batch_size: int = 16) -> list[list[int]]:
    """The student's answer token ids (eos cut) for each record's image and question, as served:
    no teacher outputs in the batch. Greedy, or sampled at ``cfg.sample_temperature``."""
    from distillery.students.data import prepare_requests

    device = next(model.parameters()).device
    was_training, out = model.training, []
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch, _ = prepare_requests([{"image": r.image_bytes, "question": r.question} for r in chunk], model.cfg,
                                    model.schema, model.text_tokenizer(), device)
        if cfg.decoding == "greedy":
            out.extend(model.predict_raw(batch)[node]["answer_ids"])
        else:
            out.extend(sample_answers(model, batch, node, cfg.sample_temperature, gen))
    model.train(was_training)
    return out


def sample_answers(model, batch: dict, node: str, temperature: float, gen: torch.Generator) -> list[list[int]]:
    """Ancestral sampling of the [answer] task (the same cache walk as ``MultimodalStudent.greedy``)."""
    outputs, feats, state = model.encode(batch)
    index = next(i for i, s in enumerate(state["segments"], start=1) if s.name == f"{node}/answer")
    seg, start = state["segments"][index - 1], state["starts"][index - 1]
    L, cache = seg.embeds.shape[1], state["cache"]
    h = state["hidden"][:, start + L - 1]  # (B, d)
    logits, pos = model.decoder.lm_head(h), state["n_q"] + L  # (B, V), (B,)
    seg_ids = torch.full((h.shape[0], 1), index, device=h.device)
    eos = set(model.schema.text["eos_ids"])
    tokens = []
    for t in range(model.cfg.max_answer_tokens):
        probs = (logits.float() / temperature).softmax(-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].to(h.device)  # (B,)
        tokens.append(nxt)
        if all(any(int(x[j]) in eos for x in tokens) for j in range(h.shape[0])):
            break
        logits, cache = model.decoder.step(nxt, pos + t, seg_ids, cache)
    rows = torch.stack(tokens, 1).tolist()
    return [row[:next((j for j, x in enumerate(row) if x in eos), len(row))] for row in rows]


def continuation(output: dict, answer_ids: list[int], tok, eos_ids: list[int]) -> tuple[list[int], str] | str:
    """(the continuation the teacher scores, the answer text), or why the answer cannot be a target:
    "empty" (no token, or only special ones), "not_canonical" (not the tokenizer's own tokens of
    its text: the answer head re-tokenizes the text to find it), "no_prefix" (the record's
    recorded generation does not end with its answer)."""
    answer = tok.decode(answer_ids, skip_special_tokens=True).strip()
    if not answer_ids or not answer:
        return "empty"
    if list(answer_ids) not in ([*tok(a, add_special_tokens=False)["input_ids"]] for a in (answer, " " + answer)):
        return "not_canonical"
    ids = np.asarray(output.get("token_ids", []), dtype=np.int64).reshape(-1)
    start = answer_start(ids, str(output.get("answer", "")).strip(), tok, eos_ids) if ids.size else None
    if start is None:
        return "no_prefix"
    return [int(t) for t in ids[:start]] + list(answer_ids) + [int(eos_ids[0])], answer


def onpolicy_record(record: TeacherRecord, node: str, cont: list[int], answer: str, scores: dict, tok) -> TeacherRecord:
    """The record the student trains on: the input and its other nodes' outputs as recorded, the
    node's output replaced by the scored continuation (target: the student's tokens; soft labels:
    the teacher's top-k on them)."""
    out = {k: v for k, v in record.outputs[node].items() if k not in ("drafts",)}
    out |= {"text": tok.decode(cont, skip_special_tokens=True), "answer": answer, "truncated": False,
            "token_ids": np.asarray(cont, np.int32), "topk_ids": np.asarray(scores["topk_ids"], np.int32),
            "topk_logprobs": np.asarray(scores["topk_logprobs"], np.float16), "on_policy": True}
    return replace(record, outputs={**record.outputs, node: out})


# ---------------------------------------------------------------------------------------------
# Scoring through the graph, with the store as a cache
# ---------------------------------------------------------------------------------------------

@dataclass
class Scorer:
    """Scores continuations with the graph's node; the trace store's score table is its cache."""

    graph: Any  # teachers.graph.TeacherGraph
    table: Any  # teachers.scores.ScoreTable
    node: str
    fingerprint: str

    def __call__(self, round_: int, records: list[TeacherRecord], conts: list[list[int]]
                 ) -> tuple[list[dict], dict[str, float]]:
        """Each continuation's scores (stored ones read back, the others scored and stored)."""
        from distillery.teachers.graph import dependencies

        hashes = [answer_hash(c) for c in conts]
        stored = self.table.read(self.fingerprint, self.node, rounds=[round_])
        keys = [(round_, r.input_id, h, self.fingerprint, self.node) for r, h in zip(records, hashes)]
        todo = [i for i, k in enumerate(keys) if k not in stored]
        stats = {"teacher_calls": len(todo), "cached": len(keys) - len(todo), "teacher_seconds": 0.0}
        if todo:
            deps = dependencies(self.graph.teachers, self.node)
            reqs = [Request(records[i].input_id, records[i].image_path, records[i].image_bytes, records[i].question)
                    for i in todo]
            upstream = [{d: records[i].outputs[d] for d in deps if d in records[i].outputs} for i in todo]
            prompts, scores, seconds = self.graph.score_node(self.node, reqs, upstream, [conts[i] for i in todo])
            stats["teacher_seconds"] = seconds
            fresh = [ScoreRecord(round_, records[i].input_id, hashes[i], self.fingerprint, self.node, p,
                                 np.asarray(conts[i], np.int32), s, seconds / len(todo))
                     for i, p, s in zip(todo, prompts, scores)]
            self.table.append(fresh)
            stored |= {r.key: r for r in fresh}
        return [stored[k].scores for k in keys], stats


# ---------------------------------------------------------------------------------------------
# The phase
# ---------------------------------------------------------------------------------------------

def run_onpolicy(trainer, records: Sequence[TeacherRecord], scorer: Callable, cfg: OnPolicyConfig, *, seed: int,
                 offline: Any, make_dataset: Callable[[list[TeacherRecord]], Any], collate: Callable, run_key: str,
                 resume: bool = False, callback: Callable[[dict], None] | None = None) -> OnPolicySummary:
    """The on-policy rounds on ``trainer``'s model and optimizer (``students.training.trainer``),
    after its offline run. ``records``: the training split, ``offline``: its dataset (the offline
    steps' batches); ``scorer(round, records, continuations)`` -> (scores, stats) (a ``Scorer``);
    ``make_dataset(records)``: a ``TraceDataset`` of the round's on-policy records;
    ``run_key``: what an on-policy checkpoint must match to be resumed."""
    from distillery.students.data import batch_to
    from distillery.students.training.trainer import deterministic

    if trainer.ctx.distributed:
        raise ValueError("training.on_policy: the on-policy rounds run in one process (not under torchrun yet)")
    ckpt_dir, emit = trainer.out_dir / CHECKPOINTS, callback or (lambda e: None)
    summary = (resume_rounds(trainer, ckpt_dir, run_key) if resume else None) or OnPolicySummary(node=scorer.node)
    with deterministic(trainer.cfg.deterministic):
        for round_ in range(summary.rounds + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            new, stats, answered = scored_records(trainer.model, records, scorer, cfg, seed, round_, summary)
            emit({"event": "onpolicy_scored", "round": round_, **stats})
            row = train_round(trainer, make_dataset(new) if new else None, offline, cfg, seed, round_, collate,
                              batch_to, scorer.node)
            summary.rounds, summary.answered = round_, summary.answered + answered
            summary.scored, summary.skipped = summary.scored + len(new), summary.skipped + answered - len(new)
            summary.teacher_calls += stats["teacher_calls"]
            summary.cached += stats["cached"]
            summary.teacher_seconds += stats["teacher_seconds"]
            summary.steps += cfg.steps_per_round
            summary.on_policy_steps += row["on_policy_steps"]
            summary.per_round.append({"round": round_, "answered": answered, "scored": len(new), **stats, **row})
            summary.seconds += time.perf_counter() - t0
            save_checkpoint(ckpt_dir, trainer.model, {"loop": {"step": round_}, "rng": rng_state(),
                                                      "optimizer": trainer.optimizer.state_dict(), "run_key": run_key,
                                                      "summary": json.dumps(asdict(summary))}, keep=2)
            emit({"event": "onpolicy_round", **summary.per_round[-1]})
    return summary


def resume_rounds(trainer, ckpt_dir: Path, run_key: str) -> OnPolicySummary | None:
    """The latest on-policy checkpoint's weights, optimizer and RNG states put back; its summary
    (None: no checkpoint)."""
    found = sorted(ckpt_dir.glob("step_*"))
    if not found:
        return None
    payload = load_checkpoint(found[-1], trainer.model, trainer.ctx.device)
    if payload["run_key"] != run_key:
        raise ValueError(f"{found[-1]}: on-policy checkpoint of a different run (data, spec or "
                         "training.on_policy changed); use a new out_dir or drop --resume")
    trainer.optimizer.load_state_dict(payload["optimizer"])
    set_rng_state(payload["rng"])
    return OnPolicySummary(**json.loads(payload["summary"]))


def scored_records(model, records: Sequence[TeacherRecord], scorer: Callable, cfg: OnPolicyConfig, seed: int,
                   round_: int, summary: OnPolicySummary) -> tuple[list[TeacherRecord], dict[str, float], int]:
    """One round's (on-policy records, scoring stats, answers produced): the student answers its
    sample, each usable answer is scored (``summary.skipped_why`` counts the others)."""
    node = scorer.node
    tok, eos_ids = model.text_tokenizer(), list(model.schema.text["eos_ids"])
    picked = pick_inputs(records, node, cfg.samples_per_round, seed, round_)
    if not picked:
        warnings.warn(f"training.on_policy round {round_}: no training record has a usable {node!r} answer "
                      "(every one truncated, empty or failed): nothing to score", stacklevel=2)
    answers = student_answers(model, picked, node, cfg, seed + round_)
    built = [(r, continuation(r.outputs[node], a, tok, eos_ids)) for r, a in zip(picked, answers)]
    kept = [(r, c) for r, c in built if not isinstance(c, str)]
    for _, why in built:
        if isinstance(why, str):
            summary.skipped_why[why] = summary.skipped_why.get(why, 0) + 1
    if not kept:
        return [], {"teacher_calls": 0, "cached": 0, "teacher_seconds": 0.0}, len(picked)
    scores, stats = scorer(round_, [r for r, _ in kept], [c for _, (c, _) in kept])
    return [onpolicy_record(r, node, c, a, s, tok) for (r, (c, a)), s in zip(kept, scores)], stats, len(picked)


def train_round(trainer, onpolicy_ds, offline_ds, cfg: OnPolicyConfig, seed: int, round_: int, collate, batch_to,
                node: str) -> dict[str, Any]:
    """``cfg.steps_per_round`` steps at the constant ``cfg.lr``: on-policy with probability
    ``lambda`` (when the round scored anything), else offline. Draws come from (seed, round)."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = cfg.lr
    rng = np.random.default_rng([seed, round_, 11])
    bs, model, n_on, on_losses = trainer.cfg.batch_size, trainer.model, 0, []
    model.train()
    for _ in range(cfg.steps_per_round):
        on = onpolicy_ds is not None and rng.random() < cfg.gkd_lambda
        ds = onpolicy_ds if on else offline_ds
        batch = batch_to(collate([ds[int(i)] for i in rng.integers(0, len(ds), min(bs, len(ds)))]),
                         trainer.ctx.device)
        if on:
            n_on += 1
            outputs = model(batch)
            loss = onpolicy_loss(outputs[node]["answer_logits"], batch["targets"][node], cfg)
            step(trainer, loss)
            on_losses.append(float(loss.detach()))
        else:
            trainer.optimize(batch)
    return {"on_policy_steps": n_on, "onpolicy_loss": float(np.mean(on_losses)) if on_losses else None}


def step(trainer, loss: Tensor) -> None:
    """One optimizer step on ``loss`` (grad clipping as the offline steps)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if trainer.cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.cfg.grad_clip)
    trainer.optimizer.step()


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS
