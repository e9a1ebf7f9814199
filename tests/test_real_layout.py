"""The real-layout checkpoint (tests/real_layout.py) against facts of the published one, and evaluate.py on it.

The tokenizer facts are those of the real Qwen2.5-VL tokenizer; the loaded model must hold exactly the bf16
weights written under the published tensor names; evaluation must run on a config with no pad id.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import evaluate
from formats.records import Pair
from prompt import Processor, reasoner_messages
from real_layout import GENERATION_CONFIG, PREPROCESSOR_CONFIG, legacy_name, real_checkpoint  # noqa: F401


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
    """prompt.Processor on the real vocabulary: the chat template's ids with one <|image_pad|> per merged patch."""
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
