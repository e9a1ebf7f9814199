"""What the model is asked: the prompt, the answer format, and what the listener reads.

Read this file first. A `Pair` (formats/records.py) is one prompt and two images, `label` naming the one people
preferred. The reasoner reads the two images and `PROMPT.question` and answers
`<think>...</think>\n<answer>1</answer>` (or 2); the listener (section 4.3) reads the same messages followed by
the reasoning up to the answer slot (`listener_prefix`), never the reasoner's answer. models/processor.py turns
these messages and the images into the tensors a model reads.

The wording, the tags and the answer vocabulary are defined here only (`PROMPT`, the default). A run may ask in
another format, a JSON file of `PromptFormat`'s fields (`--prompt_format`): train.py writes the format it asked in
into every checkpoint (prompt_format.json), and evaluate.py and reward_model.py ask a checkpoint in its own
(models/prompt_format.py), so a checkpoint is never asked a question it was not trained on.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    question: str = (
        "Prompt: {prompt}\n"
        "Which of the two images above would people prefer for this prompt? Consider how well each image "
        "matches the prompt and its visual quality. Think it through inside <think> </think>, then give your "
        "answer inside <answer> </answer>: 1 for the first image or 2 for the second."
    )
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    between: str = "\n"  # what goes between </think> and <answer> in a well-formed completion
    answers: tuple[str, str] = ("1", "2")  # naming image 0, image 1 (eq. (4) writes 0, 1)
    # The absolute-score variant (section 5, eq. (3)): one image, a rating from `ratings`.
    score_question: str = (
        "Prompt: {prompt}\n"
        "Rate how much people would like the image above for this prompt, from 1 (worst) to 5 (best). Think it "
        "through inside <think> </think>, then give the rating inside <answer> </answer>."
    )
    ratings: tuple[str, ...] = ("1", "2", "3", "4", "5")
    no_thinking: str = "I have finished thinking."  # the "no thinking" ablation (table 5)

    def completion(self, reasoning: str, answer: str) -> str:
        """A well-formed completion: `<think>reasoning</think>\\n<answer>answer</answer>`."""
        return self.answer_prefix(reasoning) + answer + self.answer_close

    def answer_prefix(self, reasoning: str) -> str:
        """Everything a completion holds before its answer token: what the listener reads."""
        return f"{self.think_open}{reasoning}{self.think_close}{self.between}{self.answer_open}"


PROMPT = PromptFormat()


def reasoner_messages(prompt: str, fmt: PromptFormat = PROMPT) -> list[dict]:
    """Chat messages for the reasoner: image A, image B, then the question about `prompt`."""
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": fmt.question.format(prompt=prompt)}]
    return [{"role": "user", "content": content}]


def score_messages(prompt: str, fmt: PromptFormat = PROMPT) -> list[dict]:
    """Chat messages for the absolute-score variant: one image, then the rating question."""
    content = [{"type": "image"}, {"type": "text", "text": fmt.score_question.format(prompt=prompt)}]
    return [{"role": "user", "content": content}]


def listener_prefix(reasoning: str, fmt: PromptFormat = PROMPT) -> str:
    """The listener's assistant turn: the reasoner's reasoning, its answer removed, up to the answer slot.

    The listener reads the reasoner's messages followed by this text and we read its next-token logits over
    `fmt.answers` (section 4.3). It never sees the reasoner's answer: only `reasoning` goes in.
    """
    return fmt.answer_prefix(reasoning)
