"""A student with its own tokenizer (not the teacher LLM's): the schema marks the answer head as
cross-tokenizer, the teacher's text is re-tokenized with the student's tokenizer, the teacher's
stored top-k log-probs count through the universal logit distillation loss (sorted probabilities,
aligned by position), and a real `train` run learns and saves a student that reads and writes its
own vocabulary. (The loss's own math: tests/test_losses.py.)"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

TRAINING = {"epochs": 6, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "val_fraction": 0.0,
            "agreement_every": 0, "device": "cpu", "seed": 3, "onnx_export": False, "checkpoint_every": 100}


def student_tokenizer(path) -> str:
    """A byte-level BPE tokenizer trained on other text than the teacher's word-level one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["how many red boxes are there ? one two three", "is any box red ? no yes", "blue boxes"] * 10
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from student_support import make_records, tiny_config, write_graph

    from distillery.flows.spec import load_spec
    from distillery.teachers.graph import TeacherGraph

    root = tmp_path_factory.mktemp("cross")
    spec = load_spec(write_graph(root))
    own = student_tokenizer(root / "student-tokenizer")
    spec = spec.model_copy(update={"student": tiny_config(tokenizer=own),
                                   "training": type(spec.training)(**TRAINING)})
    fp = TeacherGraph(spec.teachers).fingerprint
    return {"root": root, "spec": spec, "own": own,
            "records": [replace(r, graph_fingerprint=fp) for r in make_records()]}


def test_schema_and_targets_use_the_student_tokenizer_with_soft_labels_by_position(setup):
    from transformers import AutoTokenizer

    from distillery.students.model.heads.llm import cross_tokenizer_target
    from distillery.students.model.schema import build_schema, load_tokenizer

    schema = build_schema(setup["spec"], setup["records"])
    own = AutoTokenizer.from_pretrained(setup["own"])
    assert schema.tokenizer == setup["own"] and schema.vocab_size == len(own)
    assert schema.nodes["reasoner"]["cross_tokenizer"] is True
    assert schema.text["eos_ids"] == [own.eos_token_id]
    out = setup["records"][0].outputs["reasoner"]
    target = cross_tokenizer_target(out, load_tokenizer(schema), schema.text, setup["spec"].student)
    ids, cap = target["rationale_ids"].tolist(), setup["spec"].student.max_rationale_tokens
    assert ids == (own(out["text"], add_special_tokens=False)["input_ids"] + [own.eos_token_id])[:cap]
    n = min(len(ids), len(out["topk_logprobs"]))
    assert target["rationale_kd_mask"].tolist() == [i < n for i in range(len(ids))]
    np.testing.assert_array_equal(target["rationale_topk_logprobs"][:n].numpy(), out["topk_logprobs"][:n])
    assert target["answer_ids"].tolist()[-1] == own.eos_token_id and not target["answer_kd_mask"].any()


def test_a_student_with_its_own_tokenizer_trains_on_the_teachers_soft_labels(setup):
    from distillery.students.serving.predictor import StudentPredictor
    from distillery.students.training.train import train
    from distillery.teachers.store import TraceStore

    traces = setup["root"] / "traces.lance"
    TraceStore(traces).append(setup["records"])
    result = train(setup["spec"], str(traces), out_dir=setup["root"] / "student", progress=False)
    losses = [h["train_loss/reasoner"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.92 * losses[0], losses  # 12 steps: learning
    saved = StudentPredictor.load(setup["root"] / "student", device="cpu")
    from transformers import AutoTokenizer

    assert saved.model.text_tokenizer().get_vocab() == AutoTokenizer.from_pretrained(setup["own"]).get_vocab()
    rec = setup["records"][0]
    answer = saved.predict([{"image": rec.image_bytes, "question": rec.question}])[0]["reasoner"]["answer"]
    assert isinstance(answer, str)
