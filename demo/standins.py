"""Tiny offline stand-ins for the models a real team downloads: what the tests, the README and
the benchmarks use where no weights can be fetched. Each is built with the real classes
(``tokenizers``, transformers, timm) and saved in the layout the real thing has:

* ``teacher-qwen2/``: a Qwen2-shaped causal LM (hidden 32, 2 layers, random weights) with a
  byte-level BPE tokenizer trained on the demo's text, a ChatML chat template and the
  generation config's EOS ids, as Qwen2.5 ships (``write_hub_llm``; ``arch="llama"`` gives a
  Llama one);
* ``student-text/``: a SmolLM2-135M-shaped text base (Llama architecture, tied embeddings,
  grouped-query attention, its own byte-level BPE vocabulary) scaled down to hidden 64 and
  2 layers (``write_text_base``; ``shape="smollm2-135m"`` keeps SmolLM2-135M's real sizes:
  30 layers, hidden 576, 49,152 rows of embeddings);
* ``mobilenetv3_small_100.safetensors``: a timm backbone's weights file (random init, the
  classification checkpoint's layout: ``write_timm_weights``).

    python -m distillery.demo.standins OUT_DIR    # writes the three, prints their paths
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["objects: 2 red boxes, 1 blue box. question: how many boxes are there? answer: three",
          "facts: pumps leak when seals wear. question: why does the pump leak? answer: the seal",
          "<think> count the red boxes then the blue ones </think> the answer is three",
          "how many red boxes are there ? one two three zero", "is any box red ? no yes blue boxes"]
# SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json), and the tiny version of it
TEXT_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rope_theta=100000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=True),
}


def demo_corpus() -> list[str]:
    """The demo world's text (prompts, documents, traces) and a few lines of the tests' scenes."""
    from distillery.demo.llm_teacher import world_text

    return world_text() + CORPUS


def byte_level_bpe(corpus: list[str], vocab_size: int, specials: list[str], eos: str, pad: str,
                   additional: list[str] | None = None, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on ``corpus`` (GPT-2's byte alphabet: any text encodes),
    as the hub's Qwen / Llama 3 / SmolLM tokenizers are, wrapped in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad,
                                  additional_special_tokens=list(additional or []))
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def write_hub_llm(path: str | Path, arch: str = "qwen2", think_special: bool = True,
                  corpus: list[str] | None = None, seed: int = 0) -> str:
    """A hub-style teacher folder: byte-level BPE tokenizer with a ChatML template, a tiny random
    Qwen2 (or Llama) model, and EOS ids (``<|im_end|>``, ``<|endoftext|>``) in its generation config."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch {arch!r}: expected 'qwen2' or 'llama'")
    specials = SPECIALS + (["<think>", "</think>"] if think_special else [])
    tok = byte_level_bpe(corpus or CORPUS, 400, specials, "<|im_end|>", "<|endoftext|>", specials[3:], CHATML)
    tok.save_pretrained(str(path))
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))
    model.generation_config = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"),
                                                             tok.convert_tokens_to_ids("<|endoftext|>")])
    model.save_pretrained(str(path))
    return str(path)


def write_text_base(path: str | Path, shape: str | dict = "tiny", corpus: list[str] | None = None,
                    vocab_size: int = 600, tokenizer_from: str | Path | None = None, seed: int = 0) -> str:
    """A SmolLM2-shaped student text base (Llama architecture, random weights) with its own
    byte-level BPE tokenizer (SmolLM2's special tokens; eos ``<|endoftext|>``). ``shape``: a key of
    ``TEXT_SHAPES`` or the config sizes themselves; ``tokenizer_from``: copy that folder's
    tokenizer instead (a text side that shares the teacher's vocabulary)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if isinstance(shape, str) and shape not in TEXT_SHAPES:
        raise ValueError(f"shape {shape!r}: expected one of {', '.join(TEXT_SHAPES)} or a dict of sizes")
    if tokenizer_from is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_from), local_files_only=True)
    else:
        tok = byte_level_bpe(corpus or CORPUS, vocab_size, SPECIALS, "<|endoftext|>", "<|endoftext|>", None, CHATML)
    tok.save_pretrained(str(path))
    kw = dict(TEXT_SHAPES[shape] if isinstance(shape, str) else shape)
    kw |= {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    kw["vocab_size"] = max(kw.get("vocab_size", 0), len(tok))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    model.save_pretrained(str(path))
    return str(path)


def write_timm_weights(path: str | Path, name: str = "mobilenetv3_small_100", seed: int = 0) -> str:
    """A timm model's weights file (``.safetensors``, the whole classification checkpoint as the
    hub ships it), random init: what ``vision_weights`` reads."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def write_all(out_dir: str | Path, corpus: list[str] | None = None) -> dict[str, str]:
    """The three stand-ins under ``out_dir``; returns their paths by role."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or demo_corpus()
    return {"teacher": write_hub_llm(out / "teacher-qwen2", corpus=corpus),
            "text_base": write_text_base(out / "student-text", corpus=corpus),
            "vision_weights": write_timm_weights(out / "mobilenetv3_small_100.safetensors")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distillery.demo.standins", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the stand-ins to")
    args = parser.parse_args(argv)
    print(json.dumps(write_all(args.out_dir), indent=1))


if __name__ == "__main__":
    main()
