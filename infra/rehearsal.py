"""A run rehearsed at its real size on this CPU: `python train.py <the run's options> --rehearse=8x80`.

Will the paper's run (Qwen2.5-VL-7B, G=10 rollouts of 512 tokens, 8 GPUs, bf16) fit, and how fast can it be? This
answers both without a GPU and without the weights. The models are built from the checkpoint directory's config.json
(its tokenizer and image processor's config too; the weights are not read) on fake tensors (torch's
`FakeTensorMode`: every tensor has its real shape, dtype and size, nothing is computed), sharded by FSDP2 over a
fake process group of GPUS ranks (this process is rank 0), at the GPU's precision (bf16 unless --precision=fp32).
Then the functions a training step runs, `train.grpo_step` itself (or `train.sft_step`), run once on the worst case
the options allow: B pairs whose prompt is --max_prompt_tokens long, both images at --max_pixels, every rollout
--max_new_tokens long (no rollout stops early; the listener reads all of it); with --eval_data, a held-out batch too.

What is measured, per phase (the rollout, the reference pass, the listener, the update, the held-out batch):
- peak memory per GPU, split as torch's `MemTracker` files it: parameters, gradients, optimiser state,
  activations (KV caches, logits, saved activations, temporaries) and buffers;
- FLOPs (torch's FLOP formulas, the same as `FlopCounterMode`'s), and each decode step's bytes read by its matrix
  products and attention (weights and KV cache), which give a time floor on a GPU of the `--rehearse_gpu` table:
  compute at peak bf16 FLOP/s, each decode step at memory bandwidth. No GPU does better; ours are held against it.

What stands in for what cannot be known or would take too long, each a worst case or exact: integer and boolean
tensors (token ids, masks, positions, image grids) are real, computed on the CPU, so every branch on them runs as
it would (`FakeMode`); a branch on a floating-point value (is the gradient norm finite?) takes the costlier side;
every sampled token is " a" (`longest_choice`: no rollout stops, the listener reads every token); the decode runs
its first two and its last two steps, the state between them advanced without computing it (`SkippingDecoder`):
the cache at its full length for the last steps, the peak is theirs, and FLOPs and bytes, affine in the step, add
up exactly from the ends; the vision tower's windowed attention runs as one call per block where no gradient
flows (`window_attention`).

The output: a table, `out_dir/rehearsal.json` ({"gpus", "gpu_gib", "phases": {name: {"peak_gib", ...}},
"peak_gib", "state_gib", "fits", ...}) and exit status 0, or 3 when the peak leaves less than HEADROOM of the GPU
(the CUDA context, NCCL's buffers, the allocator's fragmentation), naming the phase and by how much.
tests/test_rehearsal.py checks it against the same step run with real tensors under torchrun x2.
"""
from __future__ import annotations

import json
import math
import re
import time
import unittest.mock
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode, unset_fake_temporarily)
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.tensor import _sharding_prop as sharding_prop
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

GPUS = {  # dense bf16 tensor-core FLOP/s and memory bandwidth (bytes/s), SXM parts, as NVIDIA publishes them
    "h100": (989e12, 3.35e12),
    "h200": (989e12, 4.8e12),
    "a100": (312e12, 2.039e12),  # 80 GB
    "a100-40": (312e12, 1.555e12),
}
HEADROOM = 0.10  # of the GPU's memory, left free: CUDA context, NCCL buffers, allocator fragmentation
GIB = 2**30
PHASES = ("rollout", "reference", "listener", "update", "heldout")


def parse_spec(spec: str) -> tuple[int, float]:
    """'8x80' -> (8 GPUs, 80.0 GiB each), or a ValueError saying what is expected."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+(?:\.\d+)?)\s*", spec)
    if not match or int(match[1]) < 1 or float(match[2]) <= 0:
        raise ValueError(f"--rehearse={spec!r}: expected GPUSxGIB, the number of GPUs and the GiB of memory of each, "
                         f"e.g. 8x80 for eight 80 GB GPUs")
    return int(match[1]), float(match[2])


# ----------------------------------------------------------------------------------------------------------
# Fake tensors whose integers are real


class FakeMode(FakeTensorMode):
    """Floating-point tensors are fake (shape, dtype and size, no data); integer and boolean ones are real.

    Token ids, attention masks, positions, image grids and the index math on them are small and decide what the
    code does next (`.tolist()`, `nonzero`, the mRoPE indices), so an operation whose inputs are all real and whose
    result is not floating point runs for real. Anything that touches a fake tensor is fake. A boolean read off a
    fake tensor (`if torch.isfinite(norm)`) is True: the costlier side of every such branch in a step. Indexing a
    fake tensor with a real boolean mask (Qwen3-VL's DeepStack, at the image tokens) takes the mask's real
    positions. A random generator is dropped (fake tensors draw nothing). Meta tensors stay meta (a copy of a model
    is built there).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(a, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            if func is torch.ops.aten._local_scalar_dense.default and tensors[0].dtype == torch.bool:
                return True
            if kwargs.get("generator") is not None:
                kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
            if func in MASKED:  # x[mask], x[mask] = y
                args = (args[0], real_positions(args[1]), *args[2:])
            return super().__torch_dispatch__(func, types, args, kwargs)
        if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
            return NotImplemented  # a tensor subclass (DTensor) runs its own dispatch first
        device = kwargs.get("device")
        device = torch.device(device) if device is not None else tensors[0].device if tensors else None
        if device is not None and device.type == "meta":
            return _real(func, args, kwargs)
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            return _real(func, args, kwargs)
        if out is NotImplemented or any(isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())
                                        for o in pytree.tree_leaves(out)):
            return out
        return _real(func, args, kwargs)


MASKED = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


def real_positions(indices: list) -> list:
    """An index list with each real boolean mask replaced by the positions it selects (one index tensor per
    dimension it covers): what the mask does, with the data-dependent size known."""
    out = []
    for index in indices:
        if index is not None and not isinstance(index, FakeTensor) and index.dtype == torch.bool:
            out += list(_real(torch.ops.aten.nonzero.default, (index,), {}).unbind(1))
        else:
            out.append(index)
    return out


def _real(func, args, kwargs):
    with unset_fake_temporarily():
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# The ledger: memory by phase and category, FLOPs, bytes read


MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
           torch.ops.aten._scaled_dot_product_efficient_attention, torch.ops.aten._scaled_dot_product_flash_attention,
           torch.ops.aten._scaled_dot_product_flash_attention_for_cpu}
CATEGORIES = {"parameters": (_MemRefType.PARAM,), "gradients": (_MemRefType.GRAD,),
              "optimizer": (_MemRefType.OPT,), "activations": (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH),
              "buffers": (_MemRefType.BUFFER,)}


class Ledger(MemTracker):
    """MemTracker (torch.distributed._tools), keeping each phase's peak and its split by category, plus FLOPs and
    the bytes matrix products read. `phase` is set by `enter`; phases only move forward."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import FlopCounterMode
        self.flop_formulas = FlopCounterMode().flop_registry
        self.phase = None
        self.peaks: dict[str, tuple[int, dict]] = {}  # phase -> (peak bytes, bytes by category at the peak)
        self.flops: dict[str, float] = defaultdict(float)
        self.bytes_read = 0  # by matrix products and attention, while `counting`
        self.counting = False

    def enter(self, phase: str) -> None:
        """Account what follows to `phase`, if it comes after the current one."""
        if self.phase is None or PHASES.index(phase) > PHASES.index(self.phase):
            self.phase = phase
            self._update_peak_stats(None)  # what is already held counts from the phase's start

    def current(self) -> tuple[int, dict]:
        """(bytes held now, {category: bytes}), meta tensors aside."""
        totals = defaultdict(int)
        for device, snapshot in self._curr_mem_snap.items():
            if torch.device(device).type != "meta":
                for kind, size in snapshot.items():
                    totals[kind] += size
        by_category = {name: sum(totals[k] for k in kinds) for name, kinds in CATEGORIES.items()}
        return sum(by_category.values()), by_category

    # MemTracker's module hooks keep a snapshot per module call (and refuse a module called twice, as a decode
    # step calls every layer): here they only file each module's parameters, buffers and gradients as such.
    def _pre_fw_hook(self, module, inputs) -> None:
        for param in module.parameters(recurse=False):  # the gathered ones under FSDP2, in its forward
            self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            if param.requires_grad and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (param.register_hook(self._file_gradient),
                                                           param.register_post_accumulate_grad_hook(
                                                               lambda p: self._file_gradient(p.grad)))
        for buffer in module.buffers(recurse=False):
            self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)

    def _file_gradient(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def _update_peak_stats(self, peak_state) -> None:  # after every operation: the phase's peak, not the modules'
        if self.phase is None:
            return
        total = sum(s.get("Total", 0) for d, s in self._curr_mem_snap.items() if torch.device(d).type != "meta")
        if total > self.peaks.get(self.phase, (-1, None))[0]:
            self.peaks[self.phase] = self.current()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is NotImplemented or self.phase is None:
            return out
        if func is torch.ops.fsdp.split_with_sizes_copy.default:  # FSDP2 gathering weights into their full tensors
            for weight in kwargs["out"]:
                self._update_and_maybe_create_winfos(weight, _MemRefType.PARAM)
        formula = self.flop_formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.phase] += formula(*args, **(kwargs or {}), out_val=out)
        if self.counting and func._overloadpacket in MATMULS:
            self.bytes_read += sum(t.numel() * t.element_size() for t in pytree.arg_tree_leaves(*args, **(kwargs or {}))
                                   if isinstance(t, torch.Tensor))
        return out


# ----------------------------------------------------------------------------------------------------------
# The decode: its first two and last two steps


class SkippingDecoder:
    """A decoder (sample.py's steps 2-3) that runs the first two and the last two of its steps through `inner`, and
    advances `inner`'s state over the steps between without computing them: the KV cache at its full length for
    the last steps, so the decode's peak is theirs. Each run step's FLOPs and bytes read are recorded; both are
    affine in the step, so (first + last) / 2 times the number of steps is their sum."""

    def __init__(self, decoder, ledger: Ledger):
        self.decoder, self.ledger = decoder, ledger  # None: sample.CopiedCache, a new one per rollout as sample.py's
        self.steps: list[tuple[float, int]] = []  # (FLOPs, bytes read) of each run step

    def start(self, model, prefix, G: int, max_new_tokens: int):
        import sample
        self.inner = self.decoder or sample.CopiedCache()
        self.calls, self.t = max_new_tokens - 1, 0  # sample.py calls `step` once per token but the last
        self.steps.clear()
        return self.inner.start(model, prefix, G, max_new_tokens)

    def step(self, token, live):
        t, self.t = self.t, self.t + 1
        if 2 <= t < self.calls - 2:
            if t == 2:
                advance(self.inner, self.calls - 4, live)
            return self.logits
        flops, self.ledger.bytes_read, self.ledger.counting = self.ledger.flops[self.ledger.phase], 0, True
        self.logits = self.inner.step(token, live)
        self.ledger.counting = False
        self.steps.append((self.ledger.flops[self.ledger.phase] - flops, self.ledger.bytes_read))
        return self.logits

    def totals(self) -> tuple[float, float, float, int]:
        """(FLOPs, bytes read) of all the decode's steps, the bytes of its last step, and its number of steps."""
        if not self.steps:
            return 0.0, 0.0, 0.0, 0
        (f0, b0), (f1, b1) = self.steps[0], self.steps[-1]
        skipped = self.calls - len(self.steps)  # each skipped step is the mean of the two ends
        return (sum(f for f, _ in self.steps) + skipped * (f0 + f1) / 2,
                sum(b for _, b in self.steps) + skipped * (b0 + b1) / 2, b1, self.calls)


def advance(decoder, n: int, live) -> None:
    """The state of `decoder` (sample.CopiedCache or fast.static_decode.StaticDecoder) n steps further on, each row
    live, as if n tokens had been fed: the cache grown by n columns (one layer at a time, as each step grows
    it), the positions and the masks moved on."""
    from fast.static_decode import StaticDecoder
    if isinstance(decoder, StaticDecoder):
        mask = decoder.cache.mask  # (B', G, M): compiled, B' >= B prompts, the padding ones never attended to
        G = mask.shape[1]
        mask[:live.shape[0] // G, :, decoder.column:decoder.column + n] = live.view(-1, G, 1)
        decoder.next_position = decoder.next_position + n
        decoder.column += n
        decoder.column_index += n
        return
    state = decoder.state
    for layer in state.cache.layers:
        N, H, _, D = layer.keys.shape
        layer.keys = torch.cat([layer.keys, layer.keys.new_empty(N, H, n, D)], dim=-2)
        layer.values = torch.cat([layer.values, layer.values.new_empty(N, H, n, D)], dim=-2)
    state.attention_mask = torch.cat([state.attention_mask, live[:, None].to(state.attention_mask).expand(-1, n)], -1)
    state.next_position = state.next_position + n


# ----------------------------------------------------------------------------------------------------------
# The worst case the options allow


def worst_examples(cfg, processor, count: int) -> list:
    """`count` examples at the largest size the options allow: a prompt of --max_prompt_tokens tokens, each image
    of the pixel count (within --max_pixels) that gives the most image tokens."""
    from PIL import Image

    from formats.records import Pair, Rated
    from models.processor import prompt_tokens
    words = cfg.max_prompt_tokens
    prompt = " ".join(["a"] * words)
    while prompt_tokens(processor.tokenizer, prompt) > cfg.max_prompt_tokens:
        words -= max(1, (prompt_tokens(processor.tokenizer, prompt) - cfg.max_prompt_tokens) // 2)
        prompt = " ".join(["a"] * words)
    image = Image.new("RGB", largest_image(processor.image_processor))
    if cfg.mode == "score":
        return [Rated(prompt, image, 1) for _ in range(count)]
    return [Pair(prompt, (image, image), 0) for _ in range(count)]


def largest_image(image_processor) -> tuple[int, int]:
    """(width, height) in pixels of the image the processor reads as the most tokens: h x w merged patches of
    `factor` pixels, h * w as large as max_pixels allows (an aspect ratio of at most 200, as Qwen's resizing)."""
    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    units = int(size.longest_edge // factor**2)  # merged patches within max_pixels
    h, w = max(((h, units // h) for h in range(1, units + 1) if units // h and max(h, units // h) <= 200 * min(h, units // h)),
               key=lambda hw: hw[0] * hw[1])
    return w * factor, h * factor


# ----------------------------------------------------------------------------------------------------------
# The rehearsal


def rehearse(cfg) -> int:
    """Rehearse `cfg`'s run (train.Config, `cfg.rehearse` = "GPUSxGIB"); print the plan, write it to out_dir, and
    return the exit status: 0 if it fits, 3 if not."""
    gpus, gib = parse_spec(cfg.rehearse)
    started = time.time()
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    mode = FakeMode(allow_non_fake_inputs=True)
    # DTensor works out an operation's output shapes on fake tensors, in the active fake mode if there is one: it
    # gets a fake mode of its own, as on a GPU, so that the ledger does not count those global-shape tensors.
    with mode, unittest.mock.patch.object(sharding_prop, "detect_fake_mode", lambda *args: None):
        plan = run_step(cfg, gpus, torch.device("cpu"))
    plan.update(gpus=gpus, gpu_gib=gib, seconds=round(time.time() - started, 1))
    finish(plan, cfg)
    dist.destroy_process_group()
    print(table(plan, cfg))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rehearsal.json").write_text(json.dumps(plan, indent=1) + "\n")
    print(f"written to {out / 'rehearsal.json'} ({plan['seconds']:.0f} s)")
    if not plan["fits"]:
        worst = max(plan["phases"], key=lambda p: plan["phases"][p]["peak_gib"])
        over = plan["peak_gib"] - gib * (1 - HEADROOM)
        print(f"does not fit: the {worst} phase needs {plan['peak_gib']:.1f} GiB per GPU, {over:.1f} GiB more than "
              f"the {gib * (1 - HEADROOM):.1f} GiB a {gib:g} GiB GPU leaves with {HEADROOM:.0%} headroom")
        return 3
    return 0


def run_step(cfg, world: int, device: torch.device, trainer=None) -> dict:
    """One training step of `cfg` on its worst case, on `trainer` (built without weights when None), accounted
    phase by phase: {"phases": {...}, "state_gib", "kv_cache_gib", "decode": {...}}. Called inside `FakeMode` by
    `rehearse`; with real tensors and a real process group (a trainer with weights) it measures a real step."""
    import sample
    import train
    from infra.trainer import Trainer
    trainer = trainer or Trainer.for_rehearsal(cfg, world, device)
    ledger = Ledger()
    decoders = mark_phases(trainer, ledger)
    examples = worst_examples(cfg, trainer.processor, cfg.pairs_per_rank)
    settle(trainer.optimizer)
    ledger.track_external(*[m for m in (trainer.policy, trainer.reference, trainer.listener and trainer.listener.model)
                            if m is not None], trainer.optimizer)
    step = train.sft_step if cfg.mode == "sft" else train.grpo_step
    for model in {id(m): m for m in (trainer.policy, trainer.reference, trainer.listener and trainer.listener.model)
                  if m is not None}.values():
        model.model.visual.config._attn_implementation = "flash_attention_2"  # `window_attention`, below
        model.model.get_rope_index = on_real_tensors(model.model.get_rope_index)
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = window_attention(ledger)
    longest = unittest.mock.patch.object(sample, "choose", longest_choice(sample.choose, trainer.processor.tokenizer))
    with longest, ledger:
        ledger.enter("update" if cfg.mode == "sft" else "rollout")
        step(cfg, trainer, examples, 0)
        if heldout_batch(cfg, world):
            ledger.enter("heldout")
            heldout_step(cfg, trainer, examples, heldout_batch(cfg, world))
    del ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    decode = {phase: decoder.totals() for phase, decoder in decoders.items()}
    return {"phases": phase_report(ledger, decode), "state_gib": state_bytes(trainer) / GIB,
            "parameters": sum(p.numel() for p in trainer.policy.parameters()), "precision": trainer.precision}


def on_real_tensors(fn):
    """`fn` run outside the fake mode: the mRoPE index math (token ids and image grids in, positions out), real
    whatever the dtypes it computes with on the way (Qwen3-VL's are floating point)."""
    def real(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return real


def window_attention(ledger: Ledger):
    """The vision tower's attention, one call per block instead of one per window (per image in Qwen3-VL).

    Its sdpa path runs scaled_dot_product_attention once per window, hundreds of calls per block, each a few
    operations on fake tensors that cost the CPU more than the block's other work. Without autograd (sampling,
    the reference and listener passes, held-out batches), one call gives the same output and the same FLOPs
    (4 heads dim length^2 per window, counted here), without the per-window transients, which are small. With
    autograd (the update) it runs the per-window sdpa calls, as the model does. Put in as the vision config's
    "flash_attention_2", whose interface takes the windows' boundaries (cu_seq_lens)."""
    def attend(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
               **kwargs):
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()  # (windows,) real: the grid's index math
        _, heads, S, dim = query.shape  # (1, H, S, D)
        if torch.is_grad_enabled() and query.requires_grad:
            parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
            out = torch.cat([F.scaled_dot_product_attention(q, k, v, scale=scaling) for q, k, v in parts], dim=2)
            return out.transpose(1, 2), None  # (1, S, H, D)
        ledger.flops[ledger.phase] += 4 * heads * dim * sum(n * n for n in lengths)
        return query.new_empty(1, S, heads, dim), None  # (1, S, H, D)
    return attend


def longest_choice(choose, tokenizer):
    """sample.py's `choose`, run as it is (its work is counted), whose token is then always " a": never a stop
    token, so every rollout runs to --max_new_tokens, with no tag, so the listener reads all of it, the same
    tokens whether the run's tensors are fake or real."""
    token = tokenizer(" a", add_special_tokens=False)["input_ids"][0]

    def longest(logits, *args):
        _, logp = choose(logits, *args)  # (N,)
        return torch.full(logp.shape, token, dtype=torch.long, device=logp.device), logp  # (N,), (N,)
    return longest


def settle(optimizer) -> None:
    """AdamW's moments allocated, as after a run's first step: the step rehearsed is a step of a running run."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lr = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, value in zip(optimizer.param_groups, lr):
        group["lr"] = value
    optimizer.zero_grad(set_to_none=True)


def mark_phases(trainer, ledger: Ledger) -> dict:
    """Put the ledger's phase switches at the seams a step goes through: the decoder (the rollout), the hidden
    states of the reference and of the policy (the reference pass, the update), the listener's own pass.
    Returns the phases' SkippingDecoders."""
    decoders = {}
    for phase in ("rollout", "heldout"):
        decoders[phase] = SkippingDecoder(trainer.decoder, ledger)
    trainer.decoder = PhaseDecoder(decoders, ledger)
    hidden_fn = trainer.hidden_fn

    def hidden(model, *args):
        ledger.enter("update" if model is trainer.policy else "reference")
        return hidden_fn(model, *args)
    trainer.hidden_fn = hidden
    if trainer.listener is not None:
        scores = trainer.listener.scores

        def listener_scores(*args):
            ledger.enter("listener" if ledger.phase != "heldout" else "heldout")
            return scores(*args)
        trainer.listener.scores = listener_scores
    encode = trainer.encode

    def fake_images(examples):  # the pixels as the GPU holds them: counted, not computed
        return {k: torch.empty_like(v) if v.is_floating_point() else v for k, v in encode(examples).items()}
    trainer.encode = fake_images
    return decoders


class PhaseDecoder:
    """The SkippingDecoder of the current phase (a training rollout or a held-out batch)."""

    def __init__(self, decoders: dict, ledger: Ledger):
        self.decoders, self.ledger = decoders, ledger

    def start(self, *args):
        self.current = self.decoders["heldout" if self.ledger.phase == "heldout" else "rollout"]
        return self.current.start(*args)

    def step(self, token, live):
        return self.current.step(token, live)


def heldout_batch(cfg, world: int) -> int:
    """Pairs in a held-out batch on one rank: those `infra.trainer.heldout_accuracy` scores at once (at most
    `heldout_batch_pairs`, of this rank's share of --eval_pairs), when the run scores any."""
    from infra.trainer import heldout_batch_pairs
    if cfg.mode == "sft" or cfg.eval_pairs == 0 or (not cfg.eval_data and cfg.model != "toy"):
        return 0
    return min(heldout_batch_pairs(cfg), -(-cfg.eval_pairs // world))


def heldout_step(cfg, trainer, examples, batch: int) -> None:
    """A held-out batch (`heldout_accuracy`'s): greedy rollouts of `batch` worst-case pairs, the listener's read."""
    import sample
    from infra.parallel import gathered
    from models.processor import end_of_turn_ids
    pairs = (examples * batch)[:batch]
    tokenizer = trainer.processor.tokenizer
    with gathered(trainer.policy):
        rollouts = sample.sample(trainer.policy, trainer.encode(pairs), num_samples=1, max_new_tokens=cfg.max_new_tokens,
                                 temperature=0.0, stop_token_ids=end_of_turn_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id, decoder=trainer.decoder)
    if trainer.listener is not None:
        trainer.listener.p_correct(pairs, rollouts.texts(tokenizer))


def phase_report(ledger: Ledger, decode: dict) -> dict:
    """Each phase's peak (GiB, by category) and FLOPs; its decode steps' FLOPs and bytes (`decode`: phase ->
    `SkippingDecoder.totals()`)."""
    report = {}
    for phase in PHASES:
        if phase not in ledger.peaks:
            continue
        peak, by_category = ledger.peaks[phase]
        row = {"peak_gib": peak / GIB, **{f"{k}_gib": v / GIB for k, v in by_category.items()},
               "flops": ledger.flops[phase]}
        if decode.get(phase) and decode[phase][3]:
            flops, read, last, steps = decode[phase]
            row.update(decode_steps=steps, decode_flops=flops, decode_bytes=read, last_step_bytes=last)
        report[phase] = row
    return report


def state_bytes(trainer) -> int:
    """This rank's sharded fp32 weights, gradients and AdamW moments: 16 bytes a trainable parameter, sharded."""
    local = sum(getattr(p, "_local_tensor", p).numel() for p in trainer.policy.parameters() if p.requires_grad)
    return 16 * local


def finish(plan: dict, cfg) -> None:
    """The peak, whether it fits, and each phase's time floor on --rehearse_gpu."""
    flops_per_s, bandwidth = GPUS[cfg.rehearse_gpu]
    for phase, row in plan["phases"].items():
        compute = row["flops"] - row.get("decode_flops", 0)
        floor = compute / flops_per_s
        if "decode_flops" in row:  # a decode step waits for its weights and cache to be read
            floor += max(row["decode_flops"] / flops_per_s, row["decode_bytes"] / bandwidth)
        row["floor_s"] = floor
    plan["peak_gib"] = max(row["peak_gib"] for row in plan["phases"].values())
    plan["fits"] = plan["peak_gib"] <= plan["gpu_gib"] * (1 - HEADROOM)
    plan["step_floor_s"] = sum(row["floor_s"] for p, row in plan["phases"].items() if p != "heldout")
    plan["gpu"] = cfg.rehearse_gpu


def table(plan: dict, cfg) -> str:
    """The plan as a table, one row per phase."""
    head = (f"rehearsal of --model={cfg.model} --mode={cfg.mode} on {plan['gpus']} GPUs of {plan['gpu_gib']:g} GiB "
            f"({plan['precision']}; time floors on {plan['gpu']}: {GPUS[plan['gpu']][0] / 1e12:g} TFLOP/s, "
            f"{GPUS[plan['gpu']][1] / 1e12:g} TB/s)")
    cols = ("peak_gib", "parameters_gib", "gradients_gib", "optimizer_gib", "activations_gib", "buffers_gib")
    lines = [head, f"{'phase':<10}" + "".join(f"{c.removesuffix('_gib'):>13}" for c in cols) + f"{'TFLOP':>10}{'floor s':>9}"]
    for phase, row in plan["phases"].items():
        lines.append(f"{phase:<10}" + "".join(f"{row[c]:>13.2f}" for c in cols) + f"{row['flops'] / 1e12:>10.1f}"
                     f"{row['floor_s']:>9.2f}")
    lines.append(f"peak {plan['peak_gib']:.2f} GiB per GPU: {'fits' if plan['fits'] else 'does NOT fit'} in "
                 f"{plan['gpu_gib']:g} GiB with {HEADROOM:.0%} headroom; sharded fp32 state (weights, gradients, AdamW) "
                 f"{plan['state_gib']:.2f} GiB per GPU; a step's time floor {plan['step_floor_s']:.2f} s")
    return "\n".join(lines)
