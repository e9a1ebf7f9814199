"""The toy world (world.py: a tiny Qwen2.5-VL, a synthetic preference task, a small language and its judge) and
the demo that trains and compares the paper's stages on it (demo.py: `torchrun --nproc_per_node=2 train.py`)."""
