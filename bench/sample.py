"""Benchmark: `sample.sample` (one prefill per prompt, KV cache copied to the G rollouts) against
`model.generate(num_return_sequences=G, do_sample=True)`, on the same model, inputs and number of new tokens.
`sample.sample` runs three ways: its eager reference decode (`sample`), the static KV cache run eagerly
(`static`) and compiled (`compiled`, `torch.compile`; CUDA graphs on GPU), each at every `--new_tokens` length.

Both ignore EOS (stop_token_ids=[]; generate with eos_token_id=None) so both write exactly `new_tokens`
tokens per row, both block the vision special tokens (a sampled <|image_pad|> breaks the next forward), both
sample from the full distribution (temperature 1, no top-k/top-p). Timings are taken in one process, on one
model; each method's memory is measured in a fresh subprocess, after a warm-up, so the peaks do not mix:

- peak memory on CPU: the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs just
  before the timed run) minus its resident size at that moment: what the run added, torch's allocations
  included (tracemalloc does not see them), with freed heap pages given back to the OS first (malloc_trim)
  so that reused pages count; on GPU: torch.cuda.max_memory_allocated minus what was allocated before.
- time: the fastest of `repeats` runs, the methods taking turns; prefill time: a run with one new token.
  Decode time per step: the median interval between successive token choices (timestamps taken where each
  method picks its next token: `sample.choose`, a logits processor in `generate`), over all steps of all
  repeats; a median of hundreds of steps resists the bursts of load of a shared machine, which the
  difference of two end-to-end times does not. On CPU also the median CPU time of the process per step
  (`time.process_time`): with one torch thread, the work of the step itself, which time slices lost to other
  processes do not inflate (memory-bandwidth contention still does). Compile time: the first compiled run at
  a length minus the fastest one, reported apart (it is paid once per shape of the step, not per run).
- peak memory: at the longest `new_tokens` only (`--memory=0` skips it: a fresh process per method).

`--shape=7b` builds a randomly initialised model with Qwen2.5-VL-7B's dimensions (GPU only) and compares the
decode step with its memory-bandwidth floor: every decode step reads all text weights once, so it cannot take
less than (text weight bytes) / (memory bandwidth); KV-cache reads come on top.

    .venv/bin/python bench/sample.py                                        # CPU, fp32, small model
    .venv/bin/python bench/sample.py --device cuda --dtype bfloat16
    .venv/bin/python bench/sample.py --device cuda --dtype bfloat16 --shape 7b --bandwidth 3.35e12
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from infra import cli  # noqa: E402
import sample  # noqa: E402
from toy import world as toy  # noqa: E402
from models.processor import Processor  # noqa: E402
from prompt import reasoner_messages  # noqa: E402
from fast.static_decode import StaticDecoder  # noqa: E402


@dataclass
class Config:
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16
    shape: str = "small"  # small: hidden 512, 4 layers, 4 vision blocks | 7b: Qwen2.5-VL-7B's dimensions (GPU)
    prompts: int = 2  # B
    group: int = 8  # G rollouts per prompt
    new_tokens: str = "64,256"  # comma-separated lengths, each timed
    image: int = 448  # images are image x image pixels: (image / 28)^2 tokens each after the 2x2 merge
    threads: int = 2  # torch CPU threads
    bandwidth: float = 3.35e12  # GPU memory bandwidth in bytes/s (H100 SXM), for the --shape=7b floor
    seed: int = 0
    repeats: int = 3  # timings are the fastest of this many runs
    memory: int = 1  # 1: measure each method's peak memory (a fresh process each), 0: skip
    worker: str = ""  # internal: one method's peak memory, measured in this process


SMALL = dict(hidden=512, layers=4, heads=8, kv_heads=2, vision_hidden=256, vision_depth=4, vision_heads=4)
QWEN25_VL_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, vision_hidden=1280, vision_depth=32,
                    vision_heads=16)


def build_model(cfg: Config, tok):
    """The model to time: the toy tokenizer's special tokens, random weights, `cfg.shape` dimensions."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if cfg.shape == "small":
        config = toy.make_config(tok, **SMALL)
    elif cfg.shape == "7b":
        if cfg.device == "cpu":
            raise SystemExit("--shape=7b needs a GPU: pass --device=cuda --dtype=bfloat16")
        config = toy.make_config(tok, **QWEN25_VL_7B)
        text, vision = config.text_config, config.vision_config
        text.intermediate_size, text.vocab_size = 18944, 152064
        text.rope_parameters = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
        vision.intermediate_size, vision.fullatt_block_indexes = 3420, [7, 15, 23, 31]
    else:
        raise SystemExit(f"--shape must be small or 7b, got {cfg.shape!r}")
    config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model in fp32 would need 33 GB first
    try:
        with torch.device(cfg.device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.to(device=cfg.device, dtype=dtype).eval()


def build_batch(cfg: Config, tok) -> dict:
    """B prompts of the toy task, each with two image x image images."""
    processor = Processor(tok, toy.make_image_processor(min_pixels=cfg.image**2, max_pixels=cfg.image**2))
    rng = random.Random(cfg.seed)
    groups = [toy.make_group(rng, 2) for _ in range(cfg.prompts)]
    images = [[im.resize((cfg.image, cfg.image)) for im in group] for _, group, _ in groups]
    batch = processor([reasoner_messages(prompt) for prompt, _, _ in groups], images)
    return {k: v.to(cfg.device) for k, v in batch.items()}


DECODERS = {}  # method -> StaticDecoder, built once per process so that its compiled step is kept


STAMPS: list[tuple[float, float]] = []  # (perf_counter(), process_time()) at each token choice of the current run


def stamp(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # the step's kernels are done: the interval is the step's time
    STAMPS.append((time.perf_counter(), time.process_time()))


def stamped_choose(choose):
    """`sample.choose`, recording the time at which each step's logits are ready."""
    def wrapper(logits, *args, **kwargs):
        stamp(str(logits.device))
        return choose(logits, *args, **kwargs)
    return wrapper


def run_sample(model, batch, cfg: Config, new_tokens: int, method: str = "sample") -> int:
    rollouts = sample.sample(model, batch, num_samples=cfg.group, max_new_tokens=new_tokens, temperature=1.0,
                             stop_token_ids=[], decoder=DECODERS.get(method))
    return rollouts.mask.sum().item()


def run_generate(model, batch, cfg: Config, new_tokens: int, method: str = "generate") -> int:
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per step, with that step's logits
        def __call__(self, input_ids, scores):
            stamp(str(scores.device))
            return scores
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=cfg.group,
                              max_new_tokens=new_tokens, eos_token_id=None,
                              pad_token_id=model.config.text_config.pad_token_id,
                              suppress_tokens=[getattr(model.config, k) for k in sample.VISION_TOKEN_KEYS])
    with torch.no_grad():
        out = model.generate(**batch, generation_config=config,
                             logits_processor=LogitsProcessorList([Stamp()]))  # (N, T_prompt + new_tokens)
    return out[:, batch["input_ids"].shape[1]:].numel()


def memory_now(device: str) -> int:
    """Bytes in use now (GPU: allocated by torch; CPU: resident set), after resetting the peak counter."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux)
    return proc_status_kb("VmRSS") * 1024


def release_free_heap() -> None:
    """Give memory that earlier runs freed back to the OS, so the timed run's allocations show up in VmHWM
    instead of reusing pages that are already resident (glibc keeps freed heap pages by default)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be under-counted
        print("warning: malloc_trim unavailable; CPU peak memory may be under-counted", file=sys.stderr)


def memory_peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return proc_status_kb("VmHWM") * 1024


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def timed(fn, device: str) -> tuple[float, int]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, n


METHODS = {"sample": run_sample, "static": run_sample, "compiled": run_sample, "generate": run_generate}


def lengths(cfg: Config) -> list[int]:
    return [int(n) for n in cfg.new_tokens.split(",")]


def setup(cfg: Config):
    """The model, the batch, and the compile time of each length (seconds); every method warmed up."""
    torch.set_num_threads(cfg.threads)
    DECODERS.update(static=StaticDecoder(), compiled=StaticDecoder(compile=True))
    sample.choose = stamped_choose(sample.choose)
    tok = toy.make_tokenizer()
    model, batch = build_model(cfg, tok), build_batch(cfg, tok)
    compile_seconds = {}
    for method, run in METHODS.items():
        if method != "compiled":  # its first run at each length is timed below
            run(model, batch, cfg, 2, method)  # warm-up: kernels, allocator, lazy initialisation
    for n in lengths(cfg):  # the first compiled run at each length compiles the step for its cache shape
        compile_seconds[n], _ = timed(lambda: run_sample(model, batch, cfg, n, "compiled"), cfg.device)
    return model, batch, compile_seconds


def peak_memory(cfg: Config) -> dict:
    """Memory one full run of `cfg.worker` adds at its peak, measured in this (fresh) process."""
    torch.set_num_threads(cfg.threads)
    tok = toy.make_tokenizer()
    model, batch = build_model(cfg, tok), build_batch(cfg, tok)
    DECODERS.update(static=StaticDecoder(), compiled=StaticDecoder(compile=True))
    run, n = METHODS[cfg.worker], max(lengths(cfg))
    run(model, batch, cfg, n, cfg.worker)  # warm-up (and compile)
    before = memory_now(cfg.device)
    run(model, batch, cfg, n, cfg.worker)
    return {"peak_bytes": memory_peak(cfg.device) - before}


def launch(cfg, method: str, script: str = __file__) -> dict:
    """Run `script --worker=method` with `cfg`'s options in a fresh Python process and parse its result line
    (here `peak_memory`; bench/update.py runs its own workers the same way)."""
    args = [f"--{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name != "worker"]
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args, f"--worker={method}"],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{method} worker failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def timings(cfg: Config, model, batch) -> dict:
    """Fastest of `cfg.repeats` runs of each (method, length), the methods taking turns, so that load from
    other processes on a shared machine (which only ever adds time) hits them alike."""
    best = {(m, n): {"seconds": float("inf"), "prefill_seconds": float("inf"), "steps": [], "cpu_steps": []}
            for n in lengths(cfg) for m in METHODS}
    for _ in range(cfg.repeats):
        for n in lengths(cfg):
            for method, run in METHODS.items():
                prefill_s, _ = timed(lambda: run(model, batch, cfg, 1, method), cfg.device)
                STAMPS.clear()
                seconds, tokens = timed(lambda: run(model, batch, cfg, n, method), cfg.device)
                b = best[method, n]
                b["steps"] += [later[0] - earlier[0] for earlier, later in zip(STAMPS, STAMPS[1:])]  # n - 1 steps
                b["cpu_steps"] += [later[1] - earlier[1] for earlier, later in zip(STAMPS, STAMPS[1:])]
                best[method, n].update(seconds=min(seconds, b["seconds"]), tokens=tokens,
                                       prefill_seconds=min(prefill_s, b["prefill_seconds"]))
    for r in best.values():
        r["decode_step"] = statistics.median(r.pop("steps"))
        r["decode_step_cpu"] = statistics.median(r.pop("cpu_steps"))
    return best


def device_name(cfg: Config) -> str:
    if cfg.device.startswith("cuda"):
        return torch.cuda.get_device_name(cfg.device)
    return f"CPU, {os.cpu_count()} cores, torch threads {cfg.threads}"


def report(cfg: Config, results: dict, compile_seconds: dict, text_bytes: int) -> None:
    """One table per length: each method's time, and its decode step against `generate`'s."""
    rows = cfg.prompts * cfg.group
    floor = text_bytes / cfg.bandwidth  # seconds per decode step, weights read once (GPU)
    for n in lengths(cfg):
        print(f"\n{n} new tokens per row, {rows} rows")
        print(f"{'method':<10}{'seconds':>9}{'tokens/s':>10}{'prefill s':>11}{'decode ms/step':>16}"
              f"{'decode tok/s':>14}{'step vs generate':>18}{'CPU ms/step':>13}{'CPU vs generate':>17}"
              f"{'peak MiB':>10}")
        for method in METHODS:
            r, g = results[method, n], results["generate", n]
            peak = f"{r['peak_bytes'] / 2**20:>10.0f}" if "peak_bytes" in r else f"{'':>10}"
            print(f"{method:<10}{r['seconds']:>9.2f}{r['tokens'] / r['seconds']:>10.1f}{r['prefill_seconds']:>11.2f}"
                  f"{r['decode_step'] * 1e3:>16.2f}{rows / r['decode_step']:>14.0f}"
                  f"{g['decode_step'] / r['decode_step']:>17.2f}x{r['decode_step_cpu'] * 1e3:>13.2f}"
                  f"{g['decode_step_cpu'] / r['decode_step_cpu']:>16.2f}x{peak}")
            if cfg.device.startswith("cuda"):
                print(f"{'':<10}decode step {r['decode_step'] / floor:.2f}x the bandwidth floor")
        print(f"compile time of the decode step (first compiled run - fastest): "
              f"{compile_seconds[n] - results['compiled', n]['seconds']:.1f} s")
    if cfg.device.startswith("cuda"):
        print(f"bandwidth floor: {text_bytes / 1e9:.2f} GB of text weights / {cfg.bandwidth / 1e12:.2f} TB/s = "
              f"{floor * 1e3:.2f} ms/step ({rows / floor:.0f} tokens/s at {rows} rows)")


def main() -> None:
    cfg = cli.parse(Config, None, __doc__)  # --name=value, strict booleans
    if cfg.worker:
        print("RESULT " + json.dumps(peak_memory(cfg)), flush=True)
        return
    print(f"device: {device_name(cfg)}\nconfig: {cfg}", flush=True)
    memory = {method: launch(cfg, method) if cfg.memory else {} for method in METHODS}  # first: no model held yet
    model, batch, compile_seconds = setup(cfg)
    results = timings(cfg, model, batch)
    for method in METHODS:
        results[method, max(lengths(cfg))].update(memory[method])
    text = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    text_bytes = sum(p.numel() * p.element_size() for p in text)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; B={cfg.prompts} prompts of "
          f"{batch['input_ids'].shape[1]} tokens (two {cfg.image}x{cfg.image} images each), G={cfg.group}, "
          f"{cfg.dtype}; decode step: median time between two token choices")
    report(cfg, results, compile_seconds, text_bytes)


if __name__ == "__main__":
    main()
