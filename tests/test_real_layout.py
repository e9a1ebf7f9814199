"""The real-layout checkpoints (tests/real_layout.py) against facts of the published ones, and evaluate.py on them.

The tokenizer facts are those of the real Qwen2.5-VL and Qwen3-VL tokenizers; the loaded model must hold exactly
the bf16 weights written under the published tensor names; evaluation must run on a config with no pad id; our
processor's ids, masks and grids must be the official processor's (Qwen2_5_VLProcessor, Qwen3VLProcessor: they
need torchvision, which this machine's torch lacks, so their output was recorded once in an isolated environment
with torch 2.14.1 and torchvision 0.29.1, and is written below; pixel values were equal there to the last bit).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import evaluate
from formats.records import Pair
from models.processor import Processor
from prompt import reasoner_messages
from real_layout import (GENERATION_CONFIG, PREPROCESSOR_CONFIG, QWEN3_GENERATION_CONFIG, QWEN3_PREPROCESSOR_CONFIG,
                         legacy_name)


@pytest.fixture(scope="module")
def tokenizer(real_checkpoint):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(real_checkpoint)


def test_tokenizer_matches_the_published_one(tokenizer):
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer("1", add_special_tokens=False)["input_ids"] == [16]
    assert tokenizer("2", add_special_tokens=False)["input_ids"] == [17]
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                           "<|image_pad|>", "<|file_sep|>"])
    assert ids == [151643, 151644, 151645, 151652, 151655, 151664]
    assert len(tokenizer) == 151665
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", "<|endoftext|>", 151643)
    system = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).split("<|im_start|>user")[0]
    assert tokenizer(system, add_special_tokens=False)["input_ids"] == [151644, 8948, 198, 2610, 525, 264, 10950,
                                                                        17847, 13, 151645, 198]
    text = "Ünïcödé 12345 <think>a</think>\n<answer>2</answer>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_published_configs(real_checkpoint):
    config = json.loads((real_checkpoint / "config.json").read_text())
    assert "pad_token_id" not in config and "text_config" not in config  # the flat published layout
    from transformers import AutoImageProcessor, GenerationConfig
    processor = AutoImageProcessor.from_pretrained(real_checkpoint)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 12845056)
    assert list(processor.image_mean) == PREPROCESSOR_CONFIG["image_mean"]
    assert GenerationConfig.from_pretrained(real_checkpoint).eos_token_id == GENERATION_CONFIG["eos_token_id"]


def test_weights_load_under_the_published_names(real_checkpoint):
    """from_pretrained maps the published names onto the modules: every tensor comes back bit for bit."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    written = {}
    for shard in sorted(real_checkpoint.glob("model-*.safetensors")):
        written.update(load_file(shard))
    assert any(k.startswith("visual.") for k in written) and any(k.startswith("model.layers.") for k in written)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(real_checkpoint, use_safetensors=True)
    assert model.config.get_text_config().pad_token_id is None  # as with the real download
    loaded = {legacy_name(k): v for k, v in model.state_dict().items()}
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    assert model.get_input_embeddings().weight.shape[0] == 152064


def test_processor_ids_equal_the_tokenizer_with_expanded_image_pads(real_checkpoint, tokenizer, tmp_path):
    """models.processor.Processor on the real vocabulary: the chat template's ids with one <|image_pad|> per merged patch."""
    from PIL import Image
    Image.new("RGB", (64, 48), "red").save(tmp_path / "a.png")
    Image.new("RGB", (60, 60), "blue").save(tmp_path / "b.png")
    processor = Processor.from_pretrained(str(real_checkpoint), max_pixels=56 * 56)
    pair = Pair("a red fox", (str(tmp_path / "a.png"), str(tmp_path / "b.png")), 0)
    batch = processor.pairs([pair])
    text = tokenizer.apply_chat_template(reasoner_messages(pair.prompt), tokenize=False, add_generation_prompt=True)
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    expected = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * per_image[0], 1)
                         .replace("<|vision_end|><|vision_start|><|image_pad|>",
                                  "<|vision_end|><|vision_start|>" + "<|image_pad|>" * per_image[1], 1),
                         add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == expected
    assert int((batch["input_ids"] == 151655).sum()) == sum(per_image)


def test_evaluate_samples_on_a_config_without_pad_id(real_checkpoint, tmp_path):
    """Reward-model use (--prompt ... --images): sampling takes the pad id from the tokenizer."""
    from PIL import Image
    paths = []
    for i, colour in enumerate(("red", "green", "blue")):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (56, 56), colour).save(paths[-1])
    cfg = evaluate.parse_config(["--model", str(real_checkpoint), "--prompt", "a red fox", "--images", *paths,
                                 "--max-new-tokens=4", "--max_pixels", "3136", "--k=2"])
    scores = evaluate.rank_images(cfg)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)


# ----------------------------------------------------------------------------------------------------------
# The official processors' output for one prompt and two images (red 64x48, blue 96x64), recorded once with
# AutoProcessor.from_pretrained(the fixture, **bounds) in the isolated environment named at the top.

OFFICIAL = {
    "qwen2_5_vl": {"bounds": {'max_pixels': 3136}, "image_grid_thw": [[1, 4, 4], [1, 2, 4]],
                   "input_ids": [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652, 151655, 151655, 151655, 151655, 151653, 151652, 151655, 151655, 151653, 54615, 25, 264, 2518, 38835, 304, 279, 11794, 198, 23085, 315, 279, 1378, 5335, 3403, 1035, 1251, 10702, 369, 419, 9934, 30, 21144, 1246, 1632, 1817, 2168, 9071, 279, 9934, 323, 1181, 9124, 4271, 13, 21149, 432, 1526, 4766, 366, 26865, 29, 690, 26865, 8066, 1221, 2968, 697, 4226, 4766, 366, 9217, 29, 690, 9217, 26818, 220, 16, 369, 279, 1156, 2168, 476, 220, 17, 369, 279, 2086, 13, 151645, 198, 151644, 77091, 198]},
    "qwen3_vl": {"bounds": {'min_pixels': 1024, 'max_pixels': 16384}, "image_grid_thw": [[1, 4, 4], [1, 4, 6]],
                 "input_ids": [151644, 872, 198, 151652, 151655, 151655, 151655, 151655, 151653, 151652, 151655, 151655, 151655, 151655, 151655, 151655, 151653, 54615, 25, 264, 2518, 38835, 304, 279, 11794, 198, 23085, 315, 279, 1378, 5335, 3403, 1035, 1251, 10702, 369, 419, 9934, 30, 21144, 1246, 1632, 1817, 2168, 9071, 279, 9934, 323, 1181, 9124, 4271, 13, 21149, 432, 1526, 4766, 220, 151667, 220, 151668, 11, 1221, 2968, 697, 4226, 4766, 366, 9217, 29, 690, 9217, 26818, 220, 16, 369, 279, 1156, 2168, 476, 220, 17, 369, 279, 2086, 13, 151645, 198, 151644, 77091, 198]},
}
IMAGE_PAD = 151655


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_processor_equals_the_official_one(family, real_checkpoint, qwen3_checkpoint):
    from PIL import Image
    checkpoint = {"qwen2_5_vl": real_checkpoint, "qwen3_vl": qwen3_checkpoint}[family]
    expected = OFFICIAL[family]
    images = [Image.new("RGB", (64, 48), (200, 40, 40)), Image.new("RGB", (96, 64), (40, 40, 200))]
    batch = Processor.from_pretrained(str(checkpoint), **expected["bounds"])([reasoner_messages("a red fox in the snow")],
                                                                              [images])
    assert batch["input_ids"][0].tolist() == expected["input_ids"]
    assert batch["attention_mask"][0].tolist() == [1] * len(expected["input_ids"])
    assert batch["mm_token_type_ids"][0].tolist() == [int(i == IMAGE_PAD) for i in expected["input_ids"]]
    assert batch["image_grid_thw"].tolist() == expected["image_grid_thw"]


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_checkpoint):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen3_checkpoint)


def test_qwen3_tokenizer_matches_the_published_one(qwen3_tokenizer):
    tokenizer = qwen3_tokenizer
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer("1", add_special_tokens=False)["input_ids"] == [16]
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                           "<|image_pad|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                                           "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151652, 151655, 151664, 151665, 151666, 151667, 151668]
    assert len(tokenizer) == 151669
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", "<|endoftext|>", 151643)
    # no default system turn, unlike Qwen2.5-VL's template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the reasoner's tags: <think> and </think> are one token each here, <answer> is text
    text = "<think>a</think>\n<answer>2</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 151667 and 151668 in ids and tokenizer.decode(ids) == text


def test_qwen3_published_configs(qwen3_checkpoint):
    config = json.loads((qwen3_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and {"text_config", "vision_config"} <= set(config)
    assert "pad_token_id" not in config and "pad_token_id" not in config["text_config"] and "dtype" not in config
    assert config["text_config"]["dtype"] == "bfloat16" and config["text_config"]["rope_scaling"]["mrope_interleaved"]
    from transformers import AutoImageProcessor, GenerationConfig
    processor = AutoImageProcessor.from_pretrained(qwen3_checkpoint)
    assert processor.patch_size == 16 and processor.merge_size == 2
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (65536, 16777216)
    assert list(processor.image_mean) == QWEN3_PREPROCESSOR_CONFIG["image_mean"] == [0.5] * 3
    assert GenerationConfig.from_pretrained(qwen3_checkpoint).eos_token_id == QWEN3_GENERATION_CONFIG["eos_token_id"]
    assert (qwen3_checkpoint / "chat_template.json").is_file() and (qwen3_checkpoint / "video_preprocessor_config.json").is_file()


def test_qwen3_weights_load_under_the_published_names(qwen3_checkpoint):
    """from_pretrained reads the four bf16 shards: every tensor comes back bit for bit, DeepStack's mergers and the
    learned position embedding included."""
    from transformers import Qwen3VLForConditionalGeneration
    from models import families
    written = {}
    for shard in sorted(qwen3_checkpoint.glob("model-*-of-00004.safetensors")):
        written.update(load_file(shard))
    assert {"model.visual.pos_embed.weight", "model.visual.deepstack_merger_list.0.norm.weight",
            "model.language_model.layers.0.self_attn.q_norm.weight", "lm_head.weight"} <= set(written)
    model = families.load(qwen3_checkpoint, torch.bfloat16)
    assert isinstance(model, Qwen3VLForConditionalGeneration) and families.family_of(model).head_norm
    assert model.config.get_text_config().pad_token_id is None  # as with the real download
    loaded = model.state_dict()
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    assert model.get_input_embeddings().weight.shape[0] == 151936


def test_qwen3_max_pixels_below_its_min_pixels_is_refused(qwen3_checkpoint, tmp_path, capsys):
    """Qwen3-VL's own min_pixels is 65,536: a --max_pixels below it alone would enlarge small images past it."""
    with pytest.raises(ValueError, match="max_pixels=3136 is below the min_pixels=65536.*give min_pixels"):
        Processor.from_pretrained(str(qwen3_checkpoint), max_pixels=3136)
    (tmp_path / "test.json").write_text("[]")
    with pytest.raises(SystemExit):
        evaluate.parse_config(["--model", str(qwen3_checkpoint), "--data", f"imagereward:{tmp_path / 'test.json'}",
                               "--max_pixels=3136"])
    assert "--max_pixels=3136 is not allowed: expected --min_pixels too" in capsys.readouterr().err
    evaluate.parse_config(["--model", str(qwen3_checkpoint), "--data", f"imagereward:{tmp_path / 'test.json'}",
                           "--max_pixels=3136", "--min_pixels=1024"])  # both given: accepted
