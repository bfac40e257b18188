"""Text-only (echo) steps in the trainer: what they train, how their batches are drawn, and that
an interrupted run with them resumes to exactly the uninterrupted weights."""

from __future__ import annotations

import pytest
import torch
from test_train import (Crash, TinyStudent, assert_same_weights, config, crash_at,  # noqa: F401
                        real_config, real_setup, run, weights)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_text_echo_steps_train_the_text_side_only(real_setup):
    """Text-only steps after each full step move the decoder and the text heads, never the vision
    encoder or the conv heads (whose parameters get no gradient there). Two steps: the first
    one's learning rate is 0, the warmup's start."""
    from distillery.students.training.train import train

    def two_steps(echo: int):
        spec = real_setup["spec"].model_copy(update={"training": real_config(max_steps=2, text_echo=echo)})
        return train(spec, real_setup["traces"] + "@1", out_dir=real_setup["root"] / f"echo{echo}",
                     progress=False).model.state_dict()

    plain, echoed = two_steps(0), two_steps(2)
    slots = ("count_vec", "large_vec", "large_tag")  # the detector's text-side slot parameters
    conv = [k for k in plain if k.startswith(("vision.", "heads.detector.")) and not k.endswith(slots)]
    assert conv and all(torch.equal(plain[k], echoed[k]) for k in conv)
    text = [k for k in plain if k.startswith(("decoder.", "heads.reasoner.", "heads.retriever."))]
    assert sum(not torch.equal(plain[k], echoed[k]) for k in text) > len(text) // 2


class EchoingStudent(TinyStudent):
    """Text-only echo steps: here, the last layer alone learns (the first one sees no gradient)."""

    echoes = True

    def forward(self, batch, echo=False):
        if echo:
            with torch.no_grad():
                h = self.net[:3](batch["x"])
            return {"head": {"y": self.net[3](h)}}
        return super().forward(batch)


def test_text_echo_draws_seeded_batches_and_an_interrupted_run_resumes_exactly(tmp_path):
    cfg = config(checkpoint_every=3, text_echo=2)
    straight = run(tmp_path / "a", cfg, model_cls=EchoingStudent)
    plain = run(tmp_path / "p", config(checkpoint_every=3))
    assert not torch.equal(weights(straight.model)["net.3.weight"], weights(plain.model)["net.3.weight"])
    a, b = straight.echo_batch(0), straight.echo_batch(1)
    assert not torch.equal(a["x"], b["x"]) and torch.equal(a["x"], straight.echo_batch(0)["x"])
    with pytest.raises(Crash):
        run(tmp_path / "b", cfg, callback=crash_at(5), model_cls=EchoingStudent)
    resumed = run(tmp_path / "b", cfg, resume=True, model_cls=EchoingStudent)
    assert_same_weights(weights(straight.model), weights(resumed.model))
