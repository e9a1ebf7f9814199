"""Table 4's contradiction judge: a text model reads a reasoning and its final answer and says whether they
contradict (the paper: Qwen2.5-14B-Instruct, with the system prompt below).

Choices the paper leaves open, made here:
1. The judge is read, not sampled: it says YES when its next-token logit for the first token of "YES" exceeds
   that of "NO" after the chat template's generation prompt.
2. evaluate.py has it judge every well-formed rollout (a reasoning and a readable answer) of the pairs of table
   5; it reads the reasoning, then "Final answer: 1 (the first image)" or "... 2 (the second image)".

Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch

from models.processor import left_pad

JUDGE_SYSTEM = ("You are an expert factual verifier. Determine whether the model's final answer contradicts its "
                "reasoning. Reply with the single word YES if it contradicts, otherwise NO. Answer only YES or NO.")


def judge_messages(reasoning: str, answer: str) -> list[dict]:
    """The paper's system prompt, then the reasoning and the final answer."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Reasoning:\n{reasoning.strip()}\n\nFinal answer: {answer}"}]


def judge_margins(judge_model, judge_tokenizer, reasonings: Sequence[str], answers: Sequence[str],
                  batch_size: int = 8) -> list[float]:
    """logit("YES") - logit("NO") of the judge's next token (first token of each word), one per item."""
    if len(reasonings) != len(answers):
        raise ValueError(f"{len(reasonings)} reasonings but {len(answers)} answers")
    yes, no = (judge_tokenizer.encode(w, add_special_tokens=False)[0] for w in ("YES", "NO"))
    if yes == no:
        raise ValueError("the judge's tokenizer starts YES and NO with the same token")
    pad = judge_tokenizer.pad_token_id if judge_tokenizer.pad_token_id is not None else judge_tokenizer.eos_token_id
    device = next(judge_model.parameters()).device
    margins = []
    for start in range(0, len(reasonings), batch_size):
        rows = [judge_tokenizer.apply_chat_template(judge_messages(r, a), tokenize=False, add_generation_prompt=True)
                for r, a in zip(reasonings[start:start + batch_size], answers[start:start + batch_size])]
        batch = left_pad([judge_tokenizer(t, add_special_tokens=False)["input_ids"] for t in rows], pad)
        mask = batch["attention_mask"].to(device)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) each row counts from its first real token
        with torch.no_grad():
            logits = judge_model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                                 position_ids=positions, logits_to_keep=1).logits[:, -1].float()  # (B, V)
        margins += (logits[:, yes] - logits[:, no]).tolist()
    return margins


def judge_verdicts(judge_model, judge_tokenizer, reasonings: Sequence[str], answers: Sequence[str],
                   batch_size: int = 8) -> list[bool]:
    """True where the judge says YES (the answer contradicts the reasoning): logit(YES) > logit(NO)."""
    return [m > 0 for m in judge_margins(judge_model, judge_tokenizer, reasonings, answers, batch_size)]


def contradiction_rate(judge_model, judge_tokenizer, reasonings: Sequence[str], answers: Sequence[str],
                       batch_size: int = 8) -> float:
    """Table 4: the fraction of (reasoning, answer) pairs the judge calls contradictory."""
    verdicts = judge_verdicts(judge_model, judge_tokenizer, reasonings, answers, batch_size)
    return statistics.fmean(verdicts) if verdicts else math.nan


def make_toy_judge(tokenizer, seed: int = 0):
    """A tiny random `Qwen2ForCausalLM` over `tokenizer`: the judge of table 4 with nothing downloaded.

    Weights drawn wider than usual (std 0.3) so that its verdict depends on what it reads.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, initializer_range=0.3, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config).eval()



def load_judge(path: str, device, dtype):
    """(model, tokenizer) of a local causal LM checkpoint with a chat template (safetensors weights only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 local_files_only=True).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
