"""The rehearsals of docs/performance.md, each printed side by side: the README's 8-GPU commands, each memory fix of
this code undone one at a time, and what fits where (`python train.py ... --rehearse=GPUSxGIB`, infra/rehearsal.py).

No download: the checkpoint directories hold the published config.json of each model (as its Hub page has it), the
published preprocessor config and a tokenizer with the real Qwen vocabulary (tests/real_layout.py), and no weights,
which a rehearsal does not read. Each rehearsal runs in a process of its own (a fake process group per process).

    .venv/bin/python bench/rehearsal.py                 # all of it, about 35 minutes on 2 cores
    .venv/bin/python bench/rehearsal.py --only=fixes    # the 7B command with each fix undone
    .venv/bin/python bench/rehearsal.py --only=shared   # the update with and without --shared_prompt

The fixes, and how each is undone here (the code before them, in the same run):
  chunked_logprobs   the LM head and log-softmax a chunk at a time, recomputed in the backward (grpo.token_logprobs)
                     <- the whole (N, T, V) logits at once, their fp32 log-softmax kept for the backward
  frozen_reshard     frozen models (reference, listener) free their gathered root and LM head after each forward
                     <- kept gathered, as the policy's are, for the whole run
  decode_no_copy     --decode=static runs on the gathered policy's own weights
                     <- on a bf16 copy of the text weights, beside the gathered ones, kept for the whole run
  fused_adamw        AdamW fused: no temporaries
                     <- foreach AdamW (PyTorch's default on a GPU): a temporary the size of the weights
  prompt_pass_after  the shared-prompt update backpropagates through the prompt pass after the completions
                     (fast/shared_prompt.py), so each layer's gradient is reduced as soon as it is whole
                     <- one backward: every layer's gradient from the completions waits for the prompt pass's
  heldout_rows       held-out scoring in batches of a training step's rollout rows (infra.trainer.heldout_batch_pairs)
                     <- 64 pairs a batch
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QWEN25_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                 "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                 "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}
QWEN25_TOKENS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
                 "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
                 "video_token_id": 151656}


def qwen25(hidden: int, ffn: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> dict:
    """A published Qwen2.5-VL-*-Instruct config.json (flat layout, no pad_token_id)."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, **QWEN25_TOKENS,
            "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": ffn,
            "max_position_embeddings": 128000, "max_window_layers": layers, "model_type": "qwen2_5_vl",
            "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
            "use_cache": True, "use_sliding_window": False, "vocab_size": vocab,
            "vision_config": {**QWEN25_VISION, "out_hidden_size": hidden},
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}


def qwen3(hidden: int, ffn: int, layers: int, heads: int, tied: bool, vision: dict) -> dict:
    """A published Qwen3-VL-*-Instruct config.json (nested text_config and vision_config)."""
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
            "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                            "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": hidden,
                            "initializer_range": 0.02, "intermediate_size": ffn, "max_position_embeddings": 262144,
                            "model_type": "qwen3_vl_text", "num_attention_heads": heads, "num_hidden_layers": layers,
                            "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 5000000,
                            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                            "tie_word_embeddings": tied, "use_cache": True, "vocab_size": 151936},
            "tie_word_embeddings": tied, "video_token_id": 151656, "vision_end_token_id": 151653,
            "vision_start_token_id": 151652,
            "vision_config": {"hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02,
                              "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                              "out_hidden_size": hidden, "patch_size": 16, "spatial_merge_size": 2,
                              "temporal_patch_size": 2, **vision}}


MODELS = {
    "Qwen2.5-VL-7B-Instruct": qwen25(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen2.5-VL-3B-Instruct": qwen25(2048, 11008, 36, 16, 2, 151936, True),
    "Qwen3-VL-8B-Instruct": qwen3(4096, 12288, 36, 32, False, {"depth": 27, "hidden_size": 1152,
                                                                "intermediate_size": 4304,
                                                                "deepstack_visual_indexes": [8, 16, 24]}),
    "Qwen3-VL-2B-Instruct": qwen3(2048, 6144, 28, 16, True, {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                                                              "deepstack_visual_indexes": [5, 11, 17]}),
}

# The README's 8-GPU training command (its data paths aside: a rehearsal reads no data).
README = ["--mode=grpo", "--train_data=hpdv2:/data/HPDv2/train.json", "--eval_data=imagereward:/data/ImageReward/test.json",
          "--group_size=10", "--pairs_per_rank=2", "--max_new_tokens=512", "--lr=1e-6", "--beta=0.04",
          "--activation_checkpointing=true", "--decode=static", "--shared_prompt=true", "--listener_from_reference=true"]
PIXELS = {"Qwen2.5-VL": "--max_pixels=200704", "Qwen3-VL": "--max_pixels=262144"}  # 256 tokens an image
FIXES = ("chunked_logprobs", "frozen_reshard", "decode_no_copy", "fused_adamw", "prompt_pass_after", "heldout_rows")


def runs() -> dict[str, list[tuple[str, str, list[str], tuple[str, ...]]]]:
    """{section: [(label, model, extra options, fixes undone)]}."""
    cmd = lambda model: README + [PIXELS[model.rsplit("-", 2)[0]]]
    return {
        "fixes": [("all fixes", "Qwen2.5-VL-7B-Instruct", cmd("Qwen2.5-VL-7B-Instruct") + ["--rehearse=8x80"], ())]
        + [(f"{fix} undone", "Qwen2.5-VL-7B-Instruct", cmd("Qwen2.5-VL-7B-Instruct") + ["--rehearse=8x80"], (fix,))
           for fix in FIXES]
        + [("all undone", "Qwen2.5-VL-7B-Instruct", cmd("Qwen2.5-VL-7B-Instruct") + ["--rehearse=8x80"], FIXES)],
        "shared": [(f"--shared_prompt={shared}, {label}", "Qwen2.5-VL-7B-Instruct",
                    [o for o in cmd("Qwen2.5-VL-7B-Instruct") if not o.startswith("--shared_prompt")] +
                    [f"--shared_prompt={shared}", "--rehearse=8x80"], undone)
                   for shared in ("true", "false") for label, undone in (("all fixes", ()),
                                                                         ("chunked_logprobs undone", ("chunked_logprobs",)))],
        "where": [("7B, 8x80", "Qwen2.5-VL-7B-Instruct", cmd("Qwen2.5-VL-7B-Instruct") + ["--rehearse=8x80"], ()),
                  ("8B, 8x80", "Qwen3-VL-8B-Instruct", cmd("Qwen3-VL-8B-Instruct") + ["--rehearse=8x80"], ()),
                  ("7B, 8x40", "Qwen2.5-VL-7B-Instruct", cmd("Qwen2.5-VL-7B-Instruct") + ["--rehearse=8x40"], ()),
                  ("8B, 8x40", "Qwen3-VL-8B-Instruct", cmd("Qwen3-VL-8B-Instruct") + ["--rehearse=8x40"], ()),
                  ("7B, 8x40, prompts <= 77 tokens", "Qwen2.5-VL-7B-Instruct",
                   cmd("Qwen2.5-VL-7B-Instruct") + ["--max_prompt_tokens=77", "--rehearse=8x40"], ()),
                  ("8B, 8x40, prompts <= 77 tokens", "Qwen3-VL-8B-Instruct",
                   cmd("Qwen3-VL-8B-Instruct") + ["--max_prompt_tokens=77", "--rehearse=8x40"], ()),
                  ("8B, 8x40, <= 77 tokens, 80 held-out", "Qwen3-VL-8B-Instruct",
                   cmd("Qwen3-VL-8B-Instruct") + ["--max_prompt_tokens=77", "--eval_pairs=80", "--rehearse=8x40"], ()),
                  ("3B, 1x80", "Qwen2.5-VL-3B-Instruct", cmd("Qwen2.5-VL-3B-Instruct") + ["--rehearse=1x80"], ()),
                  ("3B, 2x48", "Qwen2.5-VL-3B-Instruct", cmd("Qwen2.5-VL-3B-Instruct") + ["--rehearse=2x48"], ()),
                  ("2B, 1x48", "Qwen3-VL-2B-Instruct", cmd("Qwen3-VL-2B-Instruct") + ["--rehearse=1x48"], ()),
                  ("2B, 1x48, prompts <= 77 tokens", "Qwen3-VL-2B-Instruct",
                   cmd("Qwen3-VL-2B-Instruct") + ["--max_prompt_tokens=77", "--rehearse=1x48"], ())],
    }


def write_checkpoint(directory: Path, name: str) -> Path:
    """A checkpoint directory without weights: the published config.json, preprocessor config and tokenizer."""
    import real_layout
    path = directory / name
    if (path / "config.json").is_file():
        return path
    if name.startswith("Qwen3"):
        tokenizer, template = real_layout.build_qwen3_tokenizer(), real_layout.QWEN3_CHAT_TEMPLATE
        configs = {"preprocessor_config.json": real_layout.QWEN3_PREPROCESSOR_CONFIG,
                   "generation_config.json": real_layout.QWEN3_GENERATION_CONFIG}
    else:
        tokenizer, template = real_layout.build_tokenizer(), real_layout.CHAT_TEMPLATE
        configs = {"preprocessor_config.json": real_layout.PREPROCESSOR_CONFIG,
                   "generation_config.json": real_layout.GENERATION_CONFIG}
    return real_layout.write_directory(path, tokenizer, template, {**configs, "config.json": MODELS[name]}, lambda p: None)


def undo(fixes: tuple[str, ...]) -> None:
    """Put back the code before each named fix, in this process."""
    import torch

    import grpo
    from fast import static_decode
    from infra import parallel, trainer
    if "chunked_logprobs" in fixes:
        def whole_logits(head, hidden, tokens, temperature=1.0, chunk=1024):
            logits = head(hidden)  # (N, T, V) at once
            out = []
            for t in range(0, tokens.shape[1], chunk):  # fp32 chunks of positions, each kept for the backward
                part = logits[:, t:t + chunk].float() / max(temperature, 1e-6)
                out.append(part.gather(-1, tokens[:, t:t + chunk, None])[..., 0] - part.logsumexp(-1))
            return torch.cat(out, dim=1)
        grpo.token_logprobs = whole_logits
    if "frozen_reshard" in fixes:
        shard = parallel.shard

        def shard_as_policy(model, *args, **kwargs):  # the policy's units: root and LM head kept gathered
            frozen = not any(p.requires_grad for p in model.parameters())
            model = shard(model.requires_grad_(True), *args, **kwargs)
            return model.requires_grad_(False) if frozen else model
        parallel.shard = trainer.shard = shard_as_policy
    if "decode_no_copy" in fixes:
        def load_copy(self, model):  # always a plain bf16 copy of a sharded policy, its gathered layers kept
            from torch.distributed.fsdp import FSDPModule
            text, head = model.model.language_model, model.lm_head
            self.head_norm = static_decode.families.family_of(model).head_norm
            dtype = self.dtype or head.weight.dtype
            if not any(isinstance(m, FSDPModule) for m in model.modules()) and head.weight.dtype == dtype:
                self.text, self.lm_head = text, head
                return
            if self.text is None or self.text is text:
                self.text, self.lm_head = static_decode.plain_copy(text, dtype), static_decode.plain_copy(head, dtype)
            for plain, source in ((self.text, text), (self.lm_head, head)):
                tensors = {n.replace("_checkpoint_wrapped_module.", ""): t
                           for n, t in list(source.named_parameters()) + list(source.named_buffers())}
                for n, t in list(plain.named_parameters()) + list(plain.named_buffers()):
                    t.copy_(tensors[n])
        static_decode.StaticDecoder.load = load_copy
    if "prompt_pass_after" in fixes:
        from fast import shared_prompt
        shared_prompt.prompt_pass_after = lambda cache, last: (cache, last)
    if "fused_adamw" in fixes:
        def foreach(self):
            params = [p for p in self.policy.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.99),
                                     foreach=True)
        trainer.Trainer.make_optimizer = foreach
    if "heldout_rows" in fixes:
        trainer.heldout_batch_pairs = lambda cfg: 64


def worker(model_dir: str, options: list[str], fixes: tuple[str, ...], out: str) -> None:
    import train
    undo(fixes)
    cfg = train.parse_args([f"--model={model_dir}", f"--out_dir={out}"] + options)
    from infra import rehearsal
    rehearsal.rehearse(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("fixes", "shared", "where"), default=None, help="one section")
    parser.add_argument("--dir", default="", help="where the checkpoint directories go (default: a temporary one)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "FIXES", "OUT"), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        model_dir, fixes, out = args.worker
        return worker(model_dir, rest, tuple(f for f in fixes.split(",") if f), out)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="rehearsal_"))
    for section, rows in runs().items():
        if args.only and section != args.only:
            continue
        print(f"\n{section}: peak GiB per GPU by phase, the sharded fp32 state, the time floor of a step (H100)")
        print(f"{'run':<34}{'rollout':>9}{'ref':>7}{'listen':>8}{'update':>8}{'heldout':>9}{'peak':>7}{'state':>7}"
              f"{'floor s':>9}{'fits':>6}{'rehearsal s':>13}")
        for label, name, options, fixes in rows:
            out = directory / "out" / f"{section}_{label.replace(' ', '_').replace(',', '')}"
            run = subprocess.run([sys.executable, __file__, "--worker", str(write_checkpoint(directory, name)),
                                  ",".join(fixes), str(out), *options], cwd=ROOT, capture_output=True, text=True)
            if not (out / "rehearsal.json").is_file():
                print(f"{label:<34} failed: {run.stderr.strip().splitlines()[-1:] if run.stderr.strip() else run.returncode}")
                continue
            plan = json.loads((out / "rehearsal.json").read_text())
            peak = lambda phase: f"{plan['phases'][phase]['peak_gib']:.1f}" if phase in plan["phases"] else "-"
            print(f"{label:<34}{peak('rollout'):>9}{peak('reference'):>7}{peak('listener'):>8}{peak('update'):>8}"
                  f"{peak('heldout'):>9}{plan['peak_gib']:>7.1f}{plan['state_gib']:>7.1f}{plan['step_floor_s']:>9.2f}"
                  f"{'yes' if plan['fits'] else 'NO':>6}{plan['seconds']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
