"""Shared test set-up: a process group made inside one test module never leaks into the next.

Some tests join a process group of one in this process (parallel.setup_distributed, checkpoint.pick); a test
that builds its own FSDP2 group (tests/test_sample.py) would otherwise find one and skip.
"""
import pytest
import torch.distributed as dist


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
