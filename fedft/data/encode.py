r"""Tokenise :class:`~fedft.data.datasets.Records` into fixed-length tensors and batch them.

Classification: ``tokenizer(text)`` with its special tokens, truncated to ``max_length``,
right-padded; labels are the class ids.

Causal LM (instruction tuning, loss on the answer only): each example is
``prompt_ids + answer_ids + [eos]`` where

- with a chat template (``tokenizer.chat_template`` set, e.g. SmolLM2-Instruct) the prompt
  is ``apply_chat_template([{"role": "user", "content": question}],
  add_generation_prompt=True)`` and the answer is the raw answer text;
- without one the prompt is ``"Question: {question}\nAnswer:"`` (preceded by the BOS token
  when the tokenizer has one) and the answer is ``" {answer}"``.

Prompt and answer are tokenised separately (so the boundary is exact) without the
tokenizer's own special tokens. Labels are the input ids on answer + eos tokens and -100 on
prompt and padding tokens. Over-long examples keep the *end* of the prompt (the part next to
the answer, e.g. the assistant marker) and the *start* of the answer; the answer keeps at
least ``max_length // 2`` tokens (or all of them when shorter).

EOS is ``tokenizer.eos_token_id``, else ``sep_token_id`` (BERT-style tokenizers). Padding
uses ``tokenizer.pad_token_id``, else the EOS id: the id is chosen locally and the tokenizer
object is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedft.data.datasets import Records

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_FORMAT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples, right-padded to one length T.

    Attributes:
        input_ids: (N, T) long token ids.
        attention_mask: (N, T) long, 1 on real tokens and 0 on padding.
        labels: (N,) long class ids (classification) or (N, T) long next-token targets with
            -100 on prompt and padding (causal_lm; the model shifts them itself).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        if self.input_ids.dim() != 2 or self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"Encoded needs input_ids and attention_mask of one (N, T) shape; got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        if self.labels.shape[0] != n or self.labels.dim() not in (1, 2):
            raise ValueError(
                f"Encoded labels must be (N,) or (N, T); got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx: Sequence[int] | Tensor) -> Encoded:
        """The examples at ``idx`` (in that order)."""
        index = torch.as_tensor(idx, dtype=torch.long)
        return Encoded(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            labels=self.labels[index],
        )

    def as_batch(self, *, trim: bool = True) -> dict[str, Tensor]:
        """The whole set as one batch dict (``input_ids``, ``attention_mask``, ``labels``).

        With ``trim`` the columns after the longest real sequence are dropped: padding is on
        the right, masked out and (causal LM) labelled -100, so the outputs on real tokens
        are unchanged while short batches cost a fraction of ``max_length``.
        """
        ids, mask, labels = self.input_ids, self.attention_mask, self.labels
        if trim and mask.numel():
            width = max(int(mask.sum(dim=1).max()), 1)
            ids, mask = ids[:, :width], mask[:, :width]
            if labels.dim() == 2:
                labels = labels[:, :width]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _eos_id(tokenizer: Any) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither an EOS nor a SEP token; cannot end answers")


def _pad_id(tokenizer: Any) -> int:
    value = getattr(tokenizer, "pad_token_id", None)
    return int(value) if value is not None else _eos_id(tokenizer)


def _pad(rows: list[list[int]], width: int, value: int) -> Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)  # (N, T)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _mask(rows: list[list[int]], width: int) -> Tensor:
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    return (torch.arange(width)[None, :] < lengths[:, None]).long()  # (N, T)


def _encode_classification(records: Records, tokenizer: Any, max_length: int) -> Encoded:
    if records.target and not all(isinstance(t, int) for t in records.target):
        raise ValueError("classification needs int class ids as targets")
    ids = tokenizer(list(records.text), truncation=True, max_length=max_length)["input_ids"]
    rows = [list(r) for r in ids]
    return Encoded(
        input_ids=_pad(rows, max_length, _pad_id(tokenizer)),
        attention_mask=_mask(rows, max_length),
        labels=torch.tensor(list(records.target), dtype=torch.long).reshape(-1),
    )


def _prompts(records: Records, tokenizer: Any) -> tuple[list[str], list[str], list[int]]:
    """Prompt strings, answer strings and the ids to put before each prompt."""
    answers = [str(a) for a in records.target]
    if getattr(tokenizer, "chat_template", None):
        prompts = [
            str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
                )
            )
            for q in records.text
        ]
        return prompts, answers, []
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = [PROMPT_FORMAT.format(question=q) for q in records.text]
    return prompts, [" " + a for a in answers], ([] if bos is None else [int(bos)])


def _encode_causal(records: Records, tokenizer: Any, max_length: int) -> Encoded:
    prompts, answers, prefix = _prompts(records, tokenizer)
    eos = _eos_id(tokenizer)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
    rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    truncated = 0
    for p_ids, a_ids in zip(prompt_ids, answer_ids):
        prompt = prefix + list(p_ids)
        answer = list(a_ids) + [eos]
        if len(prompt) + len(answer) > max_length:
            truncated += 1
            keep_answer = min(len(answer), max(max_length - len(prompt), max_length // 2))
            answer = answer[:keep_answer]
            prompt = prompt[len(prompt) - (max_length - keep_answer) :]
        rows.append(prompt + answer)
        label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
    if truncated:
        log.info(
            "causal_lm: truncated %d of %d examples to %d tokens", truncated, len(rows), max_length
        )
    return Encoded(
        input_ids=_pad(rows, max_length, _pad_id(tokenizer)),
        attention_mask=_mask(rows, max_length),
        labels=_pad(label_rows, max_length, IGNORE_INDEX),
    )


def encode(records: Records, tokenizer: Any, *, task: str, max_length: int) -> Encoded:
    """Tokenise records to fixed-length tensors (see the module docstring for the format).

    Args:
        records: the examples.
        tokenizer: a Hugging Face tokenizer (fast or slow); it is not modified.
        task: ``"classification"`` or ``"causal_lm"``.
        max_length: T, the padded / truncated length in tokens (>= 2).

    Returns:
        ``Encoded`` with (N, T) ids and mask, and (N,) or (N, T) labels.
    """
    if max_length < 2:
        raise ValueError(f"max_length = {max_length} is not allowed: at least 2 tokens")
    if task == "classification":
        return _encode_classification(records, tokenizer, max_length)
    if task == "causal_lm":
        return _encode_causal(records, tokenizer, max_length)
    raise ValueError(f"task = {task!r} is not allowed: 'classification' or 'causal_lm'")


def batches(
    data: Encoded, *, batch_size: int, steps: int, seed: int
) -> Iterator[dict[str, Tensor]]:
    """Yield ``steps`` training minibatches drawn by shuffled epochs.

    Each epoch is a fresh permutation from one ``torch.Generator`` seeded with ``seed``, cut
    into consecutive batches of ``min(batch_size, N)`` examples (the last batch of an epoch
    may be smaller), so every example is seen once per epoch.

    Yields:
        dicts with ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels``.
    """
    if batch_size < 1 or steps < 0:
        raise ValueError(f"batch_size must be >= 1 and steps >= 0; got {batch_size}, {steps}")
    n = len(data)
    if n == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield data.subset(perm[start : start + batch_size]).as_batch()
            done += 1


def eval_batches(
    data: Encoded, *, batch_size: int, by_length: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Yield every example once, in batches of ``batch_size`` (the last may be smaller).

    In dataset order by default. With ``by_length`` the examples are ordered by length
    (longest first, ties in dataset order), so each trimmed batch is about as wide as its
    own examples rather than the longest one that happens to share it: much less padding,
    for consumers that only sum over examples (``evaluate``), not for per-example outputs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    order = torch.arange(len(data))
    if by_length and len(data):
        lengths = data.attention_mask.sum(dim=1)
        order = torch.sort(-lengths, stable=True).indices
    for start in range(0, len(data), batch_size):
        yield data.subset(order[start : start + batch_size]).as_batch()
