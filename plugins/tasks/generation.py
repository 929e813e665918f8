"""Evaluation by generation: greedy continuations of prompts and the answer taken from each."""

from __future__ import annotations

from typing import Any


def extract_answer(text: str) -> str:
    """The answer in a generated text: its first non-empty line, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def generate_texts(
    model: Any, processor: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, each ending at EOS.

    Returns the decoded new text of each prompt (special tokens removed). Works on plain and
    peft-wrapped models; the model's mode is restored afterwards.
    """
    import torch
    from transformers import GenerationConfig

    pad_id = processor.pad_token_id if processor.pad_token_id is not None else processor.eos_token_id
    # a config of its own: greedy, whatever sampling defaults the checkpoint ships with
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=processor.eos_token_id,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                texts += processor.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts
