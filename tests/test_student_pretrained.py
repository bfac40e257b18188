"""Students from pretrained parts: a timm backbone with its weights file for the vision side and a
SmolLM2-shaped causal LM folder for the text side (with LoRA through peft and frozen layers),
through the real timm, transformers and peft classes (tiny random weights, offline: the
demo's stand-ins, ``distillery.demo.standins``).

What a user relies on: `train` runs on such a spec (the detection, retrieval and answer heads
unchanged); the frozen parts are exactly the loaded weights after training and the adapters
learned; the saved student loads without the base folder and without peft and answers as the
trained one; its ONNX graphs (float, int8, ORT) answer through the torch-free runtime as torch
does, and `distillery predict`'s path and the MLflow pyfunc model answer with them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

TRAINING = {"epochs": 4, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "val_fraction": 0.0,
            "agreement_every": 0, "device": "cpu", "seed": 3, "onnx_export": True, "checkpoint_every": 100}
BACKBONE = "timm/mobilenetv3_small_100"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from safetensors.torch import load_file
    from student_support import WORDS, make_records, tiny_config, write_graph

    from distillery.demo.standins import CORPUS, write_text_base, write_timm_weights
    from distillery.flows.spec import load_spec
    from distillery.students.training.train import train
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.store import TraceStore

    root = tmp_path_factory.mktemp("pretrained")
    spec = load_spec(write_graph(root))
    base = write_text_base(root / "base", corpus=CORPUS + [" ".join(WORDS)])
    weights = write_timm_weights(root / "mobilenetv3.safetensors")
    cfg = tiny_config(vision_backbone=BACKBONE, vision_weights=weights, freeze_vision_backbone=True,
                      text_base=base, lora_rank=4, lora_alpha=8.0, freeze_text_layers=1)
    spec = spec.model_copy(update={"student": cfg, "training": type(spec.training)(**TRAINING)})
    fp = TeacherGraph(spec.teachers).fingerprint
    records = [replace(r, graph_fingerprint=fp) for r in make_records()]
    traces = root / "traces.lance"
    TraceStore(traces).append(records)
    result = train(spec, str(traces), out_dir=root / "student", progress=False)
    loaded = {"base": load_file(str(Path(base) / "model.safetensors")), "vision": load_file(weights)}
    shutil.rmtree(base)  # the saved student must not need its base folder any more
    return {"root": root, "result": result, "loaded": loaded, "records": records, "student": root / "student",
            "requests": [{"image": r.image_bytes, "question": r.question} for r in records]}


def test_the_config_names_pretrained_parts_and_refuses_what_cannot_fit(tmp_path):
    from pydantic import ValidationError
    from student_support import tiny_config

    from distillery.students.model.backbones import BackboneEncoder, read_weights

    with pytest.raises(ValidationError, match="vision_weights is set but vision_backbone is not"):
        tiny_config(vision_weights="w.safetensors")
    with pytest.raises(ValidationError, match="expected 'timm/<name>' or 'torchvision/<name>'"):
        tiny_config(vision_backbone="mobilenet")
    with pytest.raises(ValidationError, match="text_base is not set"):
        tiny_config(lora_rank=4)
    with pytest.raises(ValidationError, match="vision_stem 'patchify' shapes the built-in encoder"):
        tiny_config(vision_stem="patchify", vision_backbone="torchvision/mobilenet_v3_small")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors: no such file"):
        read_weights(tmp_path / "nowhere.safetensors")
    from distillery.demo.standins import write_timm_weights

    other = write_timm_weights(tmp_path / "other.safetensors", name="mobilenetv3_small_050")
    with pytest.raises(ValueError, match="other.safetensors: do not fit the backbone"):
        BackboneEncoder(BACKBONE, (8, 16, 32, 32), True, other)


def test_a_student_from_pretrained_parts_trains_with_frozen_parts_kept_and_adapters_learning(trained):
    result, base, vision = trained["result"], trained["loaded"]["base"], trained["loaded"]["vision"]
    losses = [h["train_loss/total"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    model = result.model
    body = dict(model.decoder.body.named_parameters())
    # frozen: the token embeddings, block 0 entirely, and every base weight under LoRA
    assert torch.equal(body["embed_tokens.weight"], base["model.embed_tokens.weight"])
    for name in ("layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"):
        assert torch.equal(body[name], base[f"model.{name}"])
    assert torch.equal(body["layers.1.self_attn.q_proj.base_layer.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    assert not body["layers.0.self_attn.q_proj.lora_B.default.weight"].any()  # block 0's adapters frozen at 0
    assert body["layers.1.self_attn.q_proj.lora_B.default.weight"].abs().sum() > 0  # block 1's learned
    net = model.vision.body.net.state_dict()  # frozen backbone: weights and BatchNorm statistics as loaded
    assert net and all(torch.equal(v, vision[k]) for k, v in net.items())
    assert model.cfg.d_model == 64  # the heads read the base's width


def test_the_saved_student_loads_without_its_base_folder_or_peft_and_answers_the_same(trained):
    from safetensors.torch import load_file

    from distillery.students.data import prepare_requests
    from distillery.students.model.student import MultimodalStudent

    folder, model = trained["student"], trained["result"].model.eval()
    assert (folder / "text_base" / "config.json").is_file()
    assert not [k for k in load_file(str(folder / "model.safetensors")) if "lora_" in k]  # merged
    loaded = MultimodalStudent.from_pretrained(folder)
    batch, _ = prepare_requests(trained["requests"], loaded.cfg, loaded.schema, loaded.tokenizer)
    a, b = model.predict_raw(batch), loaded.predict_raw(batch)
    for node in a:
        for key, value in a[node].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, b[node][key], atol=1e-4, rtol=1e-4)
            else:
                assert value == b[node][key]
    code = (f"import sys; from distillery.students.model.student import MultimodalStudent as M; "
            f"M.from_pretrained({str(folder)!r}); assert 'peft' not in sys.modules, 'peft imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_onnx_graphs_answer_like_torch_through_the_runtime_predict_and_the_pyfunc(trained):
    from types import SimpleNamespace

    from distillery.registry.pull import predict_dir
    from distillery.registry.pyfunc_model import StudentModel
    from distillery.students.serving.graphs import runtime_ready
    from distillery.students.serving.predictor import StudentPredictor
    from distillery.students.serving.runtime import StudentRuntime

    folder, requests = trained["student"], trained["requests"]
    assert runtime_ready(folder)
    torch_out = StudentPredictor.load(folder, backend="torch").predict(requests)
    float_out = StudentRuntime.load(folder, graphs="float").predict(requests)
    for t, r in zip(torch_out, float_out):
        assert r["answer"] == t["answer"]
        assert r["retriever"]["ids"] == t["retriever"]["ids"]
        np.testing.assert_allclose(r["retriever"]["scores"], t["retriever"]["scores"], atol=1e-4)
        assert r["detector"]["labels"] == t["detector"]["labels"]
    for graphs in ("int8", "ort"):
        assert isinstance(StudentRuntime.load(folder, graphs=graphs).answer(requests[0]["image"])["answer"], str)
    image = trained["root"] / "scene.png"
    image.write_bytes(requests[0]["image"])
    question = trained["records"][0].question
    assert predict_dir(folder, image, question, backend="torch")["answer"] == torch_out[0]["answer"]  # `distillery predict`
    assert isinstance(predict_dir(folder, image, question)["answer"], str)  # auto: the runtime on the int8 graphs
    served = StudentModel()
    served.load_context(SimpleNamespace(artifacts={"student": str(folder)}, model_config=None))
    assert isinstance(served.predictor, StudentRuntime)
    rows = served.predict(None, [{"image": str(image), "question": question}])
    assert len(rows) == 1 and isinstance(rows["answer"][0], str)


def test_a_torchvision_backbone_from_a_hub_style_folder_feeds_the_heads(tmp_path):
    import torchvision
    from student_support import make_records, tiny_config, write_graph

    from distillery.flows.spec import load_spec
    from distillery.students.data import TraceDataset, collate
    from distillery.students.model.schema import build_schema, load_tokenizer
    from distillery.students.model.student import MultimodalStudent

    torch.manual_seed(0)
    (tmp_path / "mnv3").mkdir()
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mnv3" / "pytorch_model.bin")
    cfg = tiny_config(vision_backbone="torchvision/mobilenet_v3_small", vision_weights=str(tmp_path / "mnv3"))
    spec = load_spec(write_graph(tmp_path)).model_copy(update={"student": cfg})
    records = make_records()
    schema = build_schema(spec, records)
    model = MultimodalStudent(cfg, schema)
    maps = model.vision(torch.zeros(2, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {"p4": (16, 16, 16), "p8": (32, 8, 8), "p16": (32, 4, 4)}
    ds = TraceDataset(records, schema, cfg, load_tokenizer(schema), train=True)
    total, per_node = model.loss(collate([ds[i] for i in range(2)]))
    total.backward()
    assert torch.isfinite(total) and set(per_node) == {"detector", "retriever", "reasoner"}


def test_a_continual_lora_run_warm_starts_its_adapted_layers_from_the_saved_student(trained, tmp_path):
    from safetensors.torch import load_file
    from student_support import WORDS

    from distillery.demo.standins import CORPUS, write_text_base
    from distillery.students.model.student import MultimodalStudent
    from distillery.students.training.train import warm_start

    saved = load_file(str(trained["student"] / "model.safetensors"))  # merged: ...q_proj.weight
    cfg = trained["result"].model.cfg.model_copy(update={"text_base": write_text_base(
        tmp_path / "base", corpus=CORPUS + [" ".join(WORDS)])})
    fresh = MultimodalStudent(cfg, trained["result"].model.schema)  # LoRA again: ...q_proj.base_layer.weight
    own = fresh.state_dict()
    lora_base = [k for k in own if ".base_layer.weight" in k]
    assert lora_base
    stats = warm_start(fresh, trained["student"])
    after = fresh.state_dict()
    for k in lora_base:
        torch.testing.assert_close(after[k], saved[k.replace(".base_layer.", ".")])  # not the text base's again
    assert stats["copied"] >= len(saved) - 2
