"""Shared test set-up.

- A process group made inside one test module never leaks into the next: some tests join a process group of one
  in this process (parallel.setup_distributed, checkpoint.pick); a test that builds its own FSDP2 group
  (tests/test_sample.py) would otherwise find one and skip.
- The real-layout checkpoints (tests/real_layout.py), built once per session for every module that asks. (Defined
  here: a session fixture imported into several test modules is a separate fixture, built again, in each.)
"""
from pathlib import Path

import pytest
import torch.distributed as dist

import real_layout


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory) -> Path:
    """A Qwen2.5-VL-7B-Instruct-like directory (tests/real_layout.py)."""
    return real_layout.build(tmp_path_factory.mktemp("real_layout") / "Qwen2.5-VL-7B-Instruct")


@pytest.fixture(scope="session")
def qwen3_checkpoint(tmp_path_factory) -> Path:
    """A Qwen3-VL-8B-Instruct-like directory (tests/real_layout.py)."""
    return real_layout.build_qwen3(tmp_path_factory.mktemp("real_layout") / "Qwen3-VL-8B-Instruct")
