"""Draws the README's two pictures with PIL: one GRPO step as data flow with shapes (docs/grpo_step.png), and the
tokens the reasoner writes against the tokens the listener reads (docs/listener_reads.png), the latter from the
toy tokenizer's own tokens of a toy completion.

    .venv/bin/python docs/pictures.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prompt import PROMPT  # noqa: E402
from toy import world  # noqa: E402

INK, GREY, BLUE, ORANGE, GREEN, PURPLE, RED = ((30, 30, 30), (150, 150, 150), (40, 100, 180), (225, 120, 20),
                                               (40, 140, 70), (120, 70, 160), (200, 40, 40))


def font(size: int):
    return ImageFont.load_default(size=size)


def box(pen, xy, lines: list[str], outline=INK, fill=(248, 248, 248), size: int = 15) -> None:
    """A rounded box at xy = (x0, y0, x1, y1) with centred lines of text, the first in bold colour."""
    pen.rounded_rectangle(xy, radius=10, outline=outline, width=2, fill=fill)
    x0, y0, x1, y1 = xy
    height = sum(size + 6 for _ in lines)
    y = (y0 + y1 - height) / 2
    for n, line in enumerate(lines):
        f = font(size + 1 if n == 0 else size - 1)
        width = pen.textlength(line, font=f)
        pen.text(((x0 + x1 - width) / 2, y), line, fill=outline if n == 0 else INK, font=f)
        y += size + 6


def arrow(pen, points, label: str = "", colour=INK, at: tuple | None = None) -> None:
    """An arrow along `points` (a polyline), its head at the last point, its label at `at` (default: above the
    middle of the first segment)."""
    pen.line([p for pt in points for p in pt], fill=colour, width=2, joint="curve")
    (x0, y0), (x1, y1) = points[-2], points[-1]
    length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1e-9)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    pen.polygon([(x1, y1), (x1 - 12 * ux + 6 * uy, y1 - 12 * uy - 6 * ux), (x1 - 12 * ux - 6 * uy, y1 - 12 * uy + 6 * ux)],
                fill=colour)
    if label:
        f = font(13)
        if at is None:
            (a, b), (c, d) = points[0], points[1]
            at = ((a + c) / 2 - pen.textlength(label, font=f) / 2, (b + d) / 2 - 20)
        pen.text(at, label, fill=colour, font=f)


def grpo_step(path: Path) -> None:
    """One GRPO step of train.py (`grpo_step`), left to right, each arrow labelled with the shape it carries."""
    image = Image.new("RGB", (1500, 600), "white")
    pen = ImageDraw.Draw(image)
    pen.text((20, 15), "One GRPO step (train.grpo_step). B pairs, G rollouts each, N = B*G rows, T completion tokens",
             fill=INK, font=font(18))
    boxes = {
        "pairs": ((20, 260, 200, 370), ["B pairs", "prompt, image a,", "image b, label"], INK),
        "sample": ((280, 240, 490, 390), ["sample.py", "prefill each pair once,", "G rollouts, KV cache", "(the policy)"], BLUE),
        "reference": ((600, 110, 840, 220), ["reference pass", "grpo.completion_logprobs", "frozen pi_ref"], GREY),
        "listener": ((600, 260, 840, 370), ["listener.py", "reads the reasoning,", "answer cut: p_corr"], GREEN),
        "reward": ((600, 440, 840, 550), ["reward.py, eq. (5)", "r_fmt + 0.5 r_acc", "+ 0.5 max(0, p_corr - 0.5)"], ORANGE),
        "advantage": ((920, 440, 1140, 550), ["grpo.py, eq. (1)", "(r - group mean)", "/ group std"], PURPLE),
        "loss": ((1180, 220, 1480, 390), ["grpo.py, eq. (2)", "policy log-probs (N, T):", "one forward, prompt + completion",
                                          "clipped ratio * A - beta * KL", "-> backward, AdamW"], RED),
    }
    for xy, lines, colour in boxes.values():
        box(pen, xy, lines, outline=colour)
    arrow(pen, [(200, 315), (280, 315)], "B")
    arrow(pen, [(490, 290), (600, 165)], "tokens (N, T)", at=(470, 200))
    arrow(pen, [(490, 315), (600, 315)], "texts (N,)")
    arrow(pen, [(490, 340), (600, 495)], "answers (N,)", at=(470, 420))
    arrow(pen, [(720, 370), (720, 440)], "p_corr (N,)", GREEN, at=(730, 395))
    arrow(pen, [(840, 495), (920, 495)], "r (N,)")
    arrow(pen, [(1140, 495), (1330, 495), (1330, 390)], "A (N,)", at=(1200, 470))
    arrow(pen, [(840, 165), (1330, 165), (1330, 220)], "pi_ref log-probs (N, T), the KL term", GREY, at=(880, 142))
    arrow(pen, [(385, 240), (385, 70), (1400, 70), (1400, 220)], "the sampled tokens and the log-probs they were drawn "
          "with (N, T): rho's old policy", BLUE, at=(560, 48))
    image.save(path)


def listener_reads(path: Path) -> None:
    """The reasoner's completion as tokens, and what the listener reads of it: everything up to the answer slot."""
    tokenizer = world.make_tokenizer()
    reasoning = world.describe("blue", 1)
    completion = PROMPT.completion(reasoning, PROMPT.answers[1])
    written = [tokenizer.decode([i]) for i in tokenizer(completion, add_special_tokens=False)["input_ids"]]
    written.append("<|im_end|>")
    heard = [tokenizer.decode([i]) for i in tokenizer(PROMPT.answer_prefix(reasoning), add_special_tokens=False)["input_ids"]]
    assert written[:len(heard)] == heard, "the listener's tokens are the completion's up to its answer slot"
    image = Image.new("RGB", (1540, 330), "white")
    pen = ImageDraw.Draw(image)
    f = font(15)
    pen.text((20, 15), f"What the reasoner writes, and what the listener reads of it (toy tokenizer; prompt 'a blue "
             f"circle', the second image blue)", fill=INK, font=font(18))

    def strip(y: int, title: str, tokens: list[str], upto: int | None) -> list[tuple[float, float]]:
        pen.text((20, y - 28), title, fill=INK, font=font(16))
        x, spots = 20, []
        box(pen, (x, y, x + 190, y + 44), ["images + prompt"], outline=GREY, size=14)  # the same for both
        x += 200
        for n, token in enumerate(tokens):
            shown = token.replace("\n", "\\n").replace(" ", "_")
            width = pen.textlength(shown, font=f) + 14
            colour = GREY if upto is not None and n >= upto else (PURPLE if token.startswith("<") else BLUE)
            if token.strip() in PROMPT.answers:
                colour = ORANGE if upto is None else GREY
            pen.rounded_rectangle((x, y, x + width, y + 44), radius=6, outline=colour, width=2,
                                  fill="white" if upto is not None and n >= upto else (246, 246, 252))
            pen.text((x + 7, y + 13), shown, fill=colour, font=f)
            spots.append((x, x + width))
            x += width + 4
        return spots

    spots = strip(90, "reasoner (policy): its rollout, as sampled; the reward reads its answer (r_acc)", written, None)
    heard_spots = strip(220, "listener (frozen): the same images, prompt and reasoning, up to the answer slot", heard, None)
    cut = spots[len(heard)][0] - 2
    pen.line((cut, 70, cut, 280), fill=RED, width=3)
    pen.text((cut + 8, 290), "the cut: the answer never reaches the listener (listener.reasoning_of)", fill=RED,
             font=font(14))
    x = heard_spots[-1][1] + 14
    box(pen, (x, 214, x + 330, 270), ["its next-token logits here, over '1' and '2':",
                                      "p_corr = p(the preferred image), eq. (4)"], outline=GREEN, size=13)
    image.save(path)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent
    grpo_step(out / "grpo_step.png")
    listener_reads(out / "listener_reads.png")
    print(f"wrote {out / 'grpo_step.png'} and {out / 'listener_reads.png'}")
