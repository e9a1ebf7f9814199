"""The toy world: a tiny Qwen2.5-VL and a synthetic preference task, built in-process with no download.

The embedded default of `train.py`, the tests and the benchmarks run here, on a CPU, in minutes. Nothing is
simplified away: the model is the real `Qwen2_5_VLForConditionalGeneration` (vision tower with window
attention, patch merger, mRoPE), only small; the tokenizer carries Qwen2.5-VL's special tokens and chat
template; the images go through the real `Qwen2VLImageProcessor`; and the synthetic data is written to disk in
the published ImageReward and HPDv2 layouts, so the toy path reads it through the same loaders as real data.

The task: a prompt names a coloured shape ("a red circle"); each image shows a shape on a grey background;
people prefer the image in the colour the prompt names, which is also vividly drawn, over images in other
colours, which are faded (as a poor generation is). Shapes are distractors.

    python toy.py OUT_DIR    # write a toy dataset to OUT_DIR and print what was written
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
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

COLD_START_REASONING = "I compare the colour of each image with the prompt."


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, image processor, model


def _corpus() -> list[str]:
    """Text the toy tokenizer's byte-level BPE is trained on: every string the toy world ever writes."""
    from data import PROMPT, reasoner_messages, score_messages
    texts = [PROMPT.question, PROMPT.score_question, PROMPT.no_thinking, COLD_START_REASONING,
             "You are a helpful assistant.", "system user assistant"]
    for colour in COLOURS:
        for shape in SHAPES:
            texts.append(f"a {colour} {shape}")
            texts.append(f"The first image is {colour}. The second image is {colour}. It is a {shape}.")
    texts += [m["content"][-1]["text"] for m in reasoner_messages("a red circle") + score_messages("a red circle")]
    texts += list("0123456789") + [" ".join(PROMPT.answers), " ".join(PROMPT.ratings)]
    return texts * 4


def make_tokenizer(vocab_size: int = 640):
    """A byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template, trained in-process.

    The prompt tags (`<think>`, `</think>`, `<answer>`, `</answer>`) are single added tokens, so the tiny
    model learns the format in a few steps. Byte-level: every string round-trips through encode/decode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from data import PROMPT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tags = [PROMPT.think_open, PROMPT.think_close, PROMPT.answer_open, PROMPT.answer_close]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens={})
    tokenizer.add_tokens(tags)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_image_processor(min_pixels: int = IMAGE_SIZE * IMAGE_SIZE, max_pixels: int = IMAGE_SIZE * IMAGE_SIZE):
    """The real Qwen2-VL image processor (PIL backend: no torchvision needed), sized for 56x56 images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def make_config(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vision_hidden: int = 64, vision_depth: int = 2, vision_heads: int = 2):
    """A tiny `Qwen2_5_VLConfig`: the real architecture at a few hundred thousand parameters."""
    from transformers import Qwen2_5_VLConfig
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
                  num_heads=vision_heads, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def make_model(tokenizer=None, seed: int = 0, **config_overrides):
    """A freshly initialised tiny `Qwen2_5_VLForConditionalGeneration` (fp32, eval mode)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    config = make_config(tokenizer, **config_overrides)
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# The synthetic task


def draw(colour: str, shape: str, rng: random.Random, faded: bool = False, size: int = IMAGE_SIZE) -> Image.Image:
    """One toy image: a `colour` `shape` on a grey background, jittered in position and size.

    `faded` washes the colour out towards the grey background: the poorly rendered kind of image.
    """
    grey = (128, 128, 128)
    image = Image.new("RGB", (size, size), grey)
    pen = ImageDraw.Draw(image)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = tuple(int(0.1 * c + 0.9 * g) if faded else c for c, g in zip(COLOURS[colour], grey))
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def make_group(rng: random.Random, n_images: int = 4):
    """A prompt and `n_images` images with their human ranking: 1 for the named colour, 2 for the others.

    The others are also faded, as a poor generation is: the preferred image both matches the prompt and is
    well rendered, so a tiny model can learn the preference from either cue (in minutes, from GRPO alone).

    At least one image matches and at least one does not, so every group holds non-tie pairs.
    """
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    n_match = rng.randint(1, n_images - 1)
    others = [c for c in COLOURS if c != colour]
    colours = [colour] * n_match + [rng.choice(others) for _ in range(n_images - n_match)]
    rng.shuffle(colours)
    images = [draw(c, rng.choice(SHAPES), rng, faded=c != colour) for c in colours]
    ranking = [1 if c == colour else 2 for c in colours]
    return f"a {colour} {shape}", images, ranking


def write_dataset(root: str | Path, n_train: int = 2000, n_test: int = 100, seed: int = 0) -> dict[str, Path]:
    """Write the toy task to `root` in the published layouts and return the paths of the index files.

    - `hpdv2/train.json`: HPDv2 train layout, one record per pair, `human_preference` marks the preferred image.
    - `imagereward/test.json`: ImageReward test layout, one record per prompt with `generations` and `ranking`.
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
    test = []
    for i in range(n_test):
        prompt, images, ranking = make_group(rng, n_images=rng.randint(3, 5))
        names = [f"part-{i:06d}/images/{i:04d}/{j}.png" for j in range(len(images))]
        for name, image in zip(names, images):
            (root / "imagereward" / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / "imagereward" / name)
        test.append({"id": f"{i:06d}-{i:04d}", "prompt": prompt, "generations": names, "ranking": ranking})
    (root / "imagereward" / "test.json").write_text(json.dumps(test))
    return {"train": root / "hpdv2" / "train.json", "train_images": root / "hpdv2",
            "test": root / "imagereward" / "test.json", "test_images": root / "imagereward"}


if __name__ == "__main__":
    out = write_dataset(sys.argv[1] if len(sys.argv) > 1 else "toy_data")
    print("\n".join(f"{k}: {v}" for k, v in out.items()))
