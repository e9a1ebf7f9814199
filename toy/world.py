"""The toy world: a tiny Qwen2.5-VL, a synthetic preference task and a small language to reason in, built
in-process with no download.

The embedded default of `train.py` (toy/demo.py), the tests and the benchmarks run here, on a CPU, in minutes.
Nothing is simplified away: the model is the real `Qwen2_5_VLForConditionalGeneration` (vision tower with
window attention, patch merger, mRoPE), only small; the tokenizer carries Qwen2.5-VL's special tokens and chat
template; the images go through the real `Qwen2VLImageProcessor`; and the synthetic data is written to disk in
the published ImageReward and HPDv2 layouts, so the toy path reads it through the same loaders as real data.

The task: a prompt names a coloured shape ("a red circle"); each image shows a shape on a grey background;
people prefer the image in the colour the prompt names, which is also vividly drawn, over images in other
colours, which are faded (as a poor generation is). Shapes are distractors.

The language: a reasoning says which image shows the colour the prompt names and that the other does not,
"The second image is blue. The other image is not.", and so argues for that image (`supports`). (A richer
language, "The first image is red. The second image is blue.", needs the reader to bind each colour to its
image; the tiny model did not learn that within a few hundred SFT steps. Here the supported image is named.) Because it says something
checkable, a rule can judge it (`judge`): does the answer contradict the reasoning (table 4 of the paper in
miniature), and do the descriptions match the images (faithfulness)?

The cold starts (`cold_start_reasoning`, `caption_example`; toy/demo.py trains them): SFT targets whose
reasoning names an image at *random* and whose answer is the one it names, so nothing in them says what people
prefer. Trained on each pair with both reasonings, a model can only explain the answer by reading the reasoning:
the listener of section 4.3. Trained on one random reasoning per pair, with captions of the same pairs ("Which
of the two images above is green?" -> "The first image is green.", about either image alike) that teach where
colours are, a model learns to write the language and to see, and for its first hundred steps its answer does
not yet follow what it wrote: the reasoner's start. GRPO then learns the preference, and the table says whether
the reasoning keeps up with the answers.

The out-of-distribution split (`ood_pair`), the paper's Rapidata evaluation in miniature: pairs that break the
training data's shortcut (the preferred image is always the vivid one) and prompts naming colour-shape
combinations training never showed (`HELD_OUT`).

    python -m toy.world OUT_DIR    # write the toy dataset to OUT_DIR and print what was written
"""
from __future__ import annotations

import functools
import json
import random
import re
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from models.processor import Processor
from prompt import PROMPT, PromptFormat, reasoner_messages, score_messages
from reward import parse_completion

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
# Colour-shape combinations the training data never shows, neither named in a prompt nor drawn: the
# out-of-distribution split (`ood_pair`) is made of them. Each colour keeps two shapes, each shape two colours.
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"))
IMAGE_SIZE = 56  # 56x56 pixels -> 4x4 patches of 14 -> 2x2 = 4 image tokens after the 2x2 merge

# Qwen2.5-VL's special tokens, in the order of the real vocabulary (ids 151643.. there; 0.. here).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL / Qwen2.5-VL chat template (images and text parts of a user turn, default system prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ORDINALS = ("first", "second")  # how the reasoning names image 0 and image 1
CAPTION_QUESTION = "Which of the two images above is {colour}?"


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, image processor, model


def _corpus() -> list[str]:
    """Text the toy tokenizer's byte-level BPE is trained on: every string the toy world ever writes."""
    texts = [PROMPT.question, PROMPT.score_question, PROMPT.no_thinking,
             "You are a helpful assistant.", "system user assistant"]
    for colour in COLOURS:
        texts += [CAPTION_QUESTION.format(colour=colour), caption(colour, 0), caption(colour, 1)]
        for shape in SHAPES:
            texts.append(f"a {colour} {shape}")
        texts += [describe(colour, 0), describe(colour, 1)]
    texts += [m["content"][-1]["text"] for m in reasoner_messages("a red circle") + score_messages("a red circle")]
    texts += list("0123456789") + [" ".join(PROMPT.answers), " ".join(PROMPT.ratings)]
    return texts * 4


FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # the toy model comes in both families (models/families.py)
QWEN3_VL_CHAT_TEMPLATE = (Path(__file__).parent / "qwen3_vl_chat_template.jinja").read_text()  # as published


def make_tokenizer(vocab_size: int = 640, family: str = "qwen2_5_vl"):
    """A byte-level BPE tokenizer with the family's special tokens and chat template, trained in-process.

    The prompt tags (`<think>`, `</think>`, `<answer>`, `</answer>`) are single added tokens, so the tiny
    model learns the format in a few steps (Qwen3-VL's own tokenizer has `<think>` and `</think>` as added tokens
    too). Byte-level: every string round-trips through encode/decode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tags = [PROMPT.think_open, PROMPT.think_close, PROMPT.answer_open, PROMPT.answer_close]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens={})
    tokenizer.add_tokens(tags)
    tokenizer.chat_template = {"qwen2_5_vl": CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}[family]
    return tokenizer


def make_image_processor(min_pixels: int | None = None, max_pixels: int | None = None, family: str = "qwen2_5_vl"):
    """The real Qwen2-VL image processor (PIL backend: no torchvision needed), sized for the toy's images: 56x56
    is 4x4 patches of 14 pixels (Qwen2.5-VL); Qwen3-VL's 16-pixel patches take them resized to 64x64. Either way
    2x2 = 4 image tokens after the merge."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    side = IMAGE_SIZE if family == "qwen2_5_vl" else 64
    pixels = dict(min_pixels=min_pixels or side * side, max_pixels=max_pixels or side * side)
    if family == "qwen2_5_vl":
        return Qwen2VLImageProcessorPil(**pixels)
    return Qwen2VLImageProcessorPil(**pixels, patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def make_processor(family: str = "qwen2_5_vl"):
    """The toy `models.processor.Processor`: the toy tokenizer and image processor."""
    return Processor(make_tokenizer(family=family), make_image_processor(family=family))


def make_config(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vision_hidden: int = 64, vision_depth: int = 2, vision_heads: int = 2, family: str = "qwen2_5_vl"):
    """A tiny config of the family's real architecture, at a few hundred thousand parameters."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
    head_dim = hidden // heads
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # must sum to head_dim / 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 63) // 64 * 64
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_heads, out_hidden_size=hidden, spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if family == "qwen2_5_vl":
        vision.update(patch_size=14, window_size=112, fullatt_block_indexes=[vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    text.update(head_dim=head_dim, attention_bias=False)
    text["rope_parameters"].update(mrope_interleaved=True)
    vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=list(range(vision_depth)))
    return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)


def make_model(tokenizer=None, seed: int = 0, family: str = "qwen2_5_vl", **config_overrides):
    """A freshly initialised tiny model of the family (fp32, eval mode)."""
    from models import families
    tokenizer = tokenizer or make_tokenizer(family=family)
    torch.manual_seed(seed)
    config = make_config(tokenizer, family=family, **config_overrides)
    config._attn_implementation = "sdpa"
    return families.model_class(families.FAMILIES[family])(config).eval()


# ----------------------------------------------------------------------------------------------------------
# The synthetic task


GREY = (128, 128, 128)


def shade(colour: str, faded: bool) -> tuple[int, int, int]:
    """The RGB a `colour` shape is drawn in: vivid, or faded 90% of the way towards the grey background."""
    return tuple(int(0.1 * c + 0.9 * g) if faded else c for c, g in zip(COLOURS[colour], GREY))


def draw(colour: str, shape: str, rng: random.Random, faded: bool = False, size: int = IMAGE_SIZE) -> Image.Image:
    """One toy image: a `colour` `shape` on a grey background, jittered in position and size.

    `faded` washes the colour out towards the grey background: the poorly rendered kind of image.
    """
    image = Image.new("RGB", (size, size), GREY)
    pen = ImageDraw.Draw(image)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = shade(colour, faded)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def seen_shapes(colour: str) -> list[str]:
    """The shapes a `colour` is drawn in, and named with, in the training and in-distribution held-out data."""
    return [shape for shape in SHAPES if (colour, shape) not in HELD_OUT]


def make_group(rng: random.Random, n_images: int = 4):
    """A prompt and `n_images` images with their human ranking: 1 for the named colour, 2 for the others.

    The others are also faded, as a poor generation is: the preferred image both matches the prompt and is
    well rendered, so a tiny model can learn the preference from either cue (in minutes, from GRPO alone);
    `ood_pair` breaks that shortcut. No prompt or image shows a combination of `HELD_OUT`.

    At least one image matches and at least one does not, so every group holds non-tie pairs.
    """
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(seen_shapes(colour))
    n_match = rng.randint(1, n_images - 1)
    others = [c for c in COLOURS if c != colour]
    colours = [colour] * n_match + [rng.choice(others) for _ in range(n_images - n_match)]
    rng.shuffle(colours)
    images = [draw(c, rng.choice(seen_shapes(c)), rng, faded=c != colour) for c in colours]
    ranking = [1 if c == colour else 2 for c in colours]
    return f"a {colour} {shape}", images, ranking


OOD_KINDS = ("both vivid", "faded match")


def ood_pair(rng: random.Random, kind: str):
    """An out-of-distribution pair, the toy's analogue of the paper's Rapidata evaluation: (prompt, images, ranking).

    The prompt names a combination of `HELD_OUT` (never named or drawn in training), and the preferred image
    shows it; the other image is in another colour. Where the training data always draws the preferred image
    vivid and the other faded, here "pick the vivid one" is no longer the answer: `kind` "both vivid" draws both
    vivid, "faded match" draws the preferred image faded and the other vivid. Only reading the prompt's colour
    off the images answers it.
    """
    if kind not in OOD_KINDS:
        raise ValueError(f"ood_pair: kind must be one of {OOD_KINDS}, got {kind!r}")
    colour, shape = rng.choice(HELD_OUT)
    other = rng.choice([c for c in COLOURS if c != colour])
    images = [draw(colour, shape, rng, faded=kind == "faded match"), draw(other, rng.choice(SHAPES), rng)]
    ranking = [1, 2]
    if rng.random() < 0.5:
        images, ranking = images[::-1], ranking[::-1]
    return f"a {colour} {shape}", images, ranking


# ----------------------------------------------------------------------------------------------------------
# The toy language: reasoning that says something, and a rule-based judge of it


def describe(colour: str, image: int) -> str:
    """A reasoning in the toy language: "The second image is blue. The other image is not." (`image` = 1)."""
    return f"The {ORDINALS[image]} image is {colour}. The other image is not."


def caption(colour: str, image: int) -> str:
    """The answer to `CAPTION_QUESTION` when image `image` (0 or 1) shows `colour`."""
    return f"The {ORDINALS[image]} image is {colour}."


def prompt_colour(prompt: str) -> str:
    """The colour a toy prompt names: "a red circle" -> "red"."""
    words = prompt.split()
    if len(words) != 3 or words[1] not in COLOURS:
        raise ValueError(f"toy prompt {prompt!r}: expected 'a COLOUR SHAPE' with COLOUR one of {list(COLOURS)}")
    return words[1]


_REASONING = re.compile(r"The (first|second) image is (\w+)\.\s+The other image is not\.")


def read_description(reasoning: str) -> tuple[str, int] | None:
    """(colour, image) for a reasoning saying that image (0 or 1) shows that colour and the other does not,
    or None if the reasoning is not exactly that in the toy language (stripped; the colour one of `COLOURS`)."""
    m = _REASONING.fullmatch(reasoning.strip())
    if m is None or m.group(2) not in COLOURS:
        return None
    return m.group(2), ORDINALS.index(m.group(1))


def supports(reasoning: str) -> int | None:
    """The image (0 or 1) a reasoning argues for: the one it says shows the colour it names; None if unreadable.

    The reasoning is read on its own terms, as the listener reads it; whether it names the prompt's colour
    and tells the truth about the images is `judge`'s faithfulness.
    """
    said = read_description(reasoning)
    return None if said is None else said[1]


def judge(prompt: str, reasoning: str | None, answer: int | None, true_colours: tuple[str, str]) -> dict:
    """The rule-based judge of one rollout: what its reasoning supports, and two verdicts on it.

    `answer`: the image the rollout answered (0, 1, or None when unreadable); `true_colours`: the colours the
    two images really show (`colour_of`). Returns
      supports       the image the reasoning argues for (`supports`), or None;
      contradiction  the reasoning argues for one image and the answer names the other (table 4's judge asks
                     the same of a 14B LLM: "does the final answer contradict the reasoning?");
      faithful       what the reasoning says is true: the colour it names is the prompt's, the image it says
                     shows that colour does, and the other does not.
    """
    said = None if reasoning is None else read_description(reasoning)
    k = None if said is None else said[1]
    named = prompt_colour(prompt)
    faithful = said is not None and said[0] == named and [c == named for c in true_colours] == [k == 0, k == 1]
    return {"supports": k, "contradiction": k is not None and answer is not None and answer != k,
            "faithful": faithful}


@functools.lru_cache(maxsize=65536)
def _colour_of_file(path: str) -> str:
    with Image.open(path) as image:
        return colour_of(image.convert("RGB"))


def colour_of(image) -> str:
    """The colour a toy image shows, read from its pixels: the shade (vivid or faded) nearest its shape's pixels.

    `image`: a PIL image or the path of one (paths are read once and remembered).
    """
    if not isinstance(image, Image.Image):
        return _colour_of_file(str(image))
    counts = [(n, rgb) for n, rgb in image.convert("RGB").getcolors(image.width * image.height) if rgb != GREY]
    if not counts:
        raise ValueError(f"toy image {image} shows no shape: every pixel is the grey background")
    _, rgb = max(counts)  # the shape's fill (drawn without anti-aliasing: one colour)
    distance = lambda c, faded: sum((a - b) ** 2 for a, b in zip(rgb, shade(c, faded)))
    return min(COLOURS, key=lambda c: min(distance(c, False), distance(c, True)))


def cold_start_reasoning(prompt: str, answer: int) -> str:
    """An SFT target's reasoning for the cold start: UNGROUNDED, consistent with `answer`.

    It says image `answer` shows the prompt's colour and the other does not, whatever the images show (the
    answers are drawn at random): the cold start learns to read such a description (which image does it argue for?) and to
    write one, not to see.
    """
    return describe(prompt_colour(prompt), answer)


def caption_example(images, rng: random.Random, answer_slot: bool = False,
                    fmt: PromptFormat = PROMPT) -> tuple[list[dict], str]:
    """The cold start's perception task on two images of different colours: (chat messages, target answer).

    It asks where one of the two colours is, drawn at random, the preferred image's or the other's alike:
    it teaches where colours are, not which image people prefer. `answer_slot`: asked in the reasoner's answer
    format (`fmt`), answered with an empty reasoning and the image's answer word at the answer slot (the request
    to answer so is PROMPT's wording: the toy world's own language).
    """
    colours = [colour_of(im) for im in images]
    if colours[0] == colours[1]:
        raise ValueError(f"caption_example needs two images of different colours, got {colours}")
    k = rng.randrange(2)
    question = CAPTION_QUESTION.format(colour=colours[k])
    if answer_slot:
        question += " " + PROMPT.question[PROMPT.question.index("Think it through"):]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]}]
    return messages, fmt.completion("", fmt.answers[k]) if answer_slot else caption(colours[k], k)


def write_dataset(root: str | Path, n_train: int = 2000, n_test: int = 100, n_ood: int = 0,
                  seed: int = 0) -> dict[str, Path]:
    """Write the toy task to `root` in the published layouts and return the paths of the index files.

    - `hpdv2/train.json`: HPDv2 train layout, one record per pair, `human_preference` marks the preferred image.
    - `imagereward/test.json`: ImageReward test layout, one record per prompt with `generations` and `ranking`.
    - `ood/test.json` (when n_ood > 0): `n_ood` out-of-distribution pairs (`ood_pair`, half of each kind) in the
      ImageReward test layout, one record of two images each.
    Images are PNG files under the layout's image root. Deterministic in `seed`.
    """
    root = Path(root)
    rng = random.Random(seed)
    (root / "hpdv2" / "train").mkdir(parents=True, exist_ok=True)
    train = []
    for i in range(n_train):
        prompt, images, ranking = make_group(rng, n_images=2)
        names = [f"train/{i:06d}_{j}.png" for j in range(2)]
        for name, image in zip(names, images):
            image.save(root / "hpdv2" / name)
        train.append({"prompt": prompt, "file_path": names, "human_preference": [int(r == 1) for r in ranking]})
    (root / "hpdv2" / "train.json").write_text(json.dumps(train))
    groups = {"imagereward": [make_group(rng, n_images=rng.randint(3, 5)) for _ in range(n_test)]}
    if n_ood:
        groups["ood"] = [ood_pair(rng, OOD_KINDS[i % 2]) for i in range(n_ood)]
    for split, made in groups.items():
        test = []
        for i, (prompt, images, ranking) in enumerate(made):
            names = [f"part-{i:06d}/images/{i:04d}/{j}.png" for j in range(len(images))]
            for name, image in zip(names, images):
                (root / split / name).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / split / name)
            test.append({"id": f"{i:06d}-{i:04d}", "prompt": prompt, "generations": names, "ranking": ranking})
        (root / split / "test.json").write_text(json.dumps(test))
    paths = {"train": root / "hpdv2" / "train.json", "train_images": root / "hpdv2",
             "test": root / "imagereward" / "test.json", "test_images": root / "imagereward"}
    if n_ood:
        paths.update(ood=root / "ood" / "test.json", ood_images=root / "ood")
    return paths


DEFAULT_SIZES = dict(n_train=4000, n_test=128, n_ood=256)  # pairs, held-out prompts (3-5 images), OOD pairs


def dataset(root: str | Path) -> dict[str, Path]:
    """The toy dataset at `root` in the default sizes, written there first if it is not (`write_dataset`): what
    train.py's `--train_data=toy` and the demo read. Call it on one process, then wait for it on the others."""
    root = Path(root)
    if not (root / "ood" / "test.json").exists():
        return write_dataset(root, **DEFAULT_SIZES, seed=0)
    return {"train": root / "hpdv2" / "train.json", "train_images": root / "hpdv2",
            "test": root / "imagereward" / "test.json", "test_images": root / "imagereward",
            "ood": root / "ood" / "test.json", "ood_images": root / "ood"}


def verdict(pair, text: str, fmt: PromptFormat = PROMPT) -> dict:
    """`judge` on one completion for a pair: the image its answer names (0, 1 or None) and the judge's verdicts."""
    reasoning, answer = parse_completion(text, fmt)
    index = fmt.answers.index(answer) if answer is not None else None
    return {"answer": index, **judge(pair.prompt, reasoning, index, tuple(map(colour_of, pair.images)))}


def is_faded(image) -> bool:
    """Whether a toy image's shape is drawn faded (washed out towards the grey background), read from its pixels."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            return is_faded(im.convert("RGB"))
    counts = [(n, rgb) for n, rgb in image.convert("RGB").getcolors(image.width * image.height) if rgb != GREY]
    _, rgb = max(counts)
    return max(abs(c - g) for c, g in zip(rgb, GREY)) < 40  # faded shades lie within 10 of grey, vivid ones 88 or more from it


def main(argv: list[str]) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m toy.world", description="Write the toy dataset (the default "
                                     "sizes of train.py's --train_data=toy) in the published layouts.")
    parser.add_argument("out_dir", help="the folder to write it to (made if missing)")
    out_dir = parser.parse_args(argv).out_dir
    from infra import cli
    try:
        cli.check_output("out_dir", out_dir, folder=True)
    except cli.OptionError as e:  # before any image is drawn
        parser.error(f"OUT_DIR {out_dir!r} is not allowed: expected {e.allowed}")
    out = write_dataset(out_dir, **DEFAULT_SIZES, seed=0)
    print("\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
