"""The repeated-prompt forward: the oracle that grpo.completion_logprobs (one prompt pass per group) must equal.

Each of the B prompts, its images included, is repeated G times and one plain forward runs over prompt +
completion for every row: simple, obviously right, and G times the prompt's work. tests/test_grpo.py compares
log-probabilities and gradients; bench/update.py times the two.
"""
import torch


def repeat_prompts(batch: dict, group_size: int) -> dict:
    """Repeat each of the B prompts of a processor batch G times, images included: B rows -> N = B*G rows.

    Rows stay prompt-major (row b*G + g is rollout g of prompt b). The patches of each prompt's images are
    repeated with it, so the vision tower sees each prompt's images once per rollout.
    """
    out = {k: batch[k].repeat_interleave(group_size, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in batch:
        grid = batch["image_grid_thw"]  # (num_images, 3)
        patches = grid.prod(-1)  # (num_images,) patches per image
        counts = images_per_row(batch["mm_token_type_ids"])  # (B,)
        image_rows = torch.repeat_interleave(torch.arange(len(counts)), counts)  # row of each image
        image_index = torch.cat([torch.nonzero(image_rows == b)[:, 0].repeat(group_size)
                                 for b in range(len(counts))])  # images of N rows, in row order
        starts = torch.cumsum(patches, 0) - patches  # first patch of each image
        patch_index = torch.cat([torch.arange(starts[i], starts[i] + patches[i]) for i in image_index.tolist()])
        out["pixel_values"] = batch["pixel_values"][patch_index]
        out["image_grid_thw"] = grid[image_index]
    return out


def images_per_row(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) image-token marks -> (B,) number of images in each row (each image is one run of marks)."""
    m = mm_token_type_ids == 1  # (B, T)
    return (m[:, 1:] & ~m[:, :-1]).sum(-1) + m[:, 0]


def completion_logprobs_repeated(model, batch: dict, completions: torch.Tensor, completion_mask: torch.Tensor,
                                 temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """log pi(token) of every completion token, one forward pass over prompt + completion with the images,
    each prompt and its images repeated G times (`repeat_prompts`): what grpo.completion_logprobs computes.

    batch: the processor's output for B prompts; completions, completion_mask: (N, T) with N = B*G,
    prompt-major. Logits are divided by the sampling temperature, so that at the first pass these equal
    the log-probabilities the sampler drew the tokens with. Only the completion's positions go through
    the LM head (`logits_to_keep`), and the float32 log-softmax runs `chunk` positions at a time: never an
    (N, T_prompt + T, V) tensor.
    Returns (N, T) float32; positions where completion_mask is 0 hold garbage that callers mask out.
    """
    N, T = completions.shape
    rows = repeat_prompts(batch, N // batch["input_ids"].shape[0])
    input_ids = torch.cat([rows["input_ids"], completions], dim=1)  # (N, P+T)
    attention_mask = torch.cat([rows["attention_mask"], completion_mask.to(rows["attention_mask"].dtype)], dim=1)
    mm_types = torch.cat([rows["mm_token_type_ids"], torch.zeros_like(completions, dtype=rows["mm_token_type_ids"].dtype)], 1)
    position_ids, _ = model.model.get_rope_index(input_ids, mm_types, rows.get("image_grid_thw"),
                                                 attention_mask=attention_mask)  # (3, N, P+T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   pixel_values=rows.get("pixel_values"), image_grid_thw=rows.get("image_grid_thw"),
                   mm_token_type_ids=mm_types, use_cache=False, logits_to_keep=T + 1).logits  # (N, T+1, V)
    logits = logits[:, :-1]  # (N, T, V): the position before each completion token predicts it
    out = []
    for t in range(0, T, chunk):  # float32 log-softmax a chunk of positions at a time
        part = logits[:, t:t + chunk].float() / max(temperature, 1e-6)  # (N, t', V)
        out.append(part.gather(-1, completions[:, t:t + chunk, None])[..., 0] - part.logsumexp(-1))  # (N, t')
    return torch.cat(out, dim=1)  # (N, T)
