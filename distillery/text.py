"""Reading an LLM's text: the reasoning trace (``<think>…</think>``), stop strings, the answer,
and the key under which answers are compared. The teacher LLM nodes, the student's decoder and
the evaluation all read text through these, so they agree on what "the answer" is.
"""

from __future__ import annotations

import string


def split_reasoning(text: str, think_start: str, think_end: str) -> tuple[str, str]:
    """(think, rest): the text between the think markers and the text after the end marker.

    No end marker: an open think block (truncated while reasoning) is all think and no answer;
    no marker at all is all answer. A missing start marker (chat templates that put ``<think>``
    in the prompt) counts the text before ``think_end`` as the think."""
    end = text.find(think_end)
    start = text.find(think_start)
    if end >= 0:
        begin = start + len(think_start) if 0 <= start < end else 0
        return text[begin:end], text[end + len(think_end):]
    if start >= 0:
        return text[start + len(think_start):], ""
    return "", text


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def parse_output(text: str, think_start: str, think_end: str, stop: list[str]) -> tuple[str, str]:
    """(think, answer), both stripped; the answer is cut at the first stop string."""
    think, rest = split_reasoning(text, think_start, think_end)
    return think.strip(), cut_at_stop(rest, stop).strip()


def normalize_answer(answer: str) -> str:
    """Key under which answers vote: lower case, single spaces, no surrounding punctuation."""
    return " ".join(answer.lower().split()).strip(string.punctuation + " ")
