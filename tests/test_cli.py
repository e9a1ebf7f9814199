"""One command line for train.py and evaluate.py (infra/cli.py): spellings, --help, and every bad option refused
before anything loads, with a message naming the option, the value and what is allowed."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from infra import cli

import evaluate
import train
from infra import trainer
from real_layout import real_checkpoint  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def refused(parse, argv, capsys, *words):
    """`parse(argv)` exits with status 2 and a message holding each of `words`."""
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    message = capsys.readouterr().err
    for w in words:
        assert w in message, (w, message)
    return message


@pytest.mark.parametrize("parse", [train.parse_args, evaluate.parse_config])
def test_every_spelling_gives_the_same_config(parse):
    spellings = [["--max_new_tokens=64", "--top_k=5", "--seed=3"], ["--max_new_tokens", "64", "--top_k", "5", "--seed", "3"],
                 ["--max-new-tokens=64", "--top-k", "5", "--seed", "3"]]
    configs = [parse(argv) for argv in spellings]
    assert all(c == configs[0] for c in configs)
    assert (configs[0].max_new_tokens, configs[0].top_k, configs[0].seed) == (64, 5, 3)


@pytest.mark.parametrize("parse", [train.parse_args, evaluate.parse_config])
def test_strict_booleans(parse, capsys):
    for text, value in [("true", True), ("1", True), ("yes", True), ("False", False), ("0", False), ("no", False)]:
        assert parse([f"--both_orders={text}"]).both_orders is value
    assert parse(["--both-orders"]).both_orders is True
    refused(parse, ["--both_orders=ture"], capsys, "both_orders", "ture", "true/false")


@pytest.mark.parametrize("script, config", [("train.py", train.Config), ("evaluate.py", evaluate.Config)])
def test_help_lists_every_option_with_its_default_and_help(script, config):
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(config):
        assert f.metadata.get("help"), f"{script}: --{f.name} has no help"
        assert f"--{f.name}" in text, f.name
    for name in ("max_new_tokens", "seed", "temperature"):
        default = getattr(config(), name)
        assert f"(default: {default})" in text, name


@pytest.mark.parametrize("argv, words", [
    (["--mode=grpoo"], ["--mode", "grpoo", "grpo"]),
    (["--mode=grpo", "--group_size=1"], ["--group_size", "1", ">= 2"]),
    (["--mode=grpo", "--temperature=0"], ["--temperature", "0", "> 0"]),
    (["--mode=score", "--temperature=0"], ["--temperature"]),
    (["--save_every=0"], ["--save_every", "0", ">= 1"]),
    (["--pairs_per_rank=0"], ["--pairs_per_rank", ">= 1"]),
    (["--num_iterations=0"], ["--num_iterations"]),
    (["--micro_pairs=0"], ["--micro_pairs"]),
    (["--max_new_tokens=0"], ["--max_new_tokens"]),
    (["--group_size=0"], ["--group_size"]),
    (["--fraction=0"], ["--fraction"]),
    (["--lr=nan"], ["--lr", "finite"]),
    (["--loss_type=mean"], ["--loss_type", "sequence"]),
    (["--both_orders=true", "--pairs_per_rank=3", "--mode=grpo"], ["--pairs_per_rank", "even"]),
    (["--steps=ten"], ["--steps", "ten"]),
    (["--no_such_option=1"], ["--no_such_option"]),
    (["--mode=grpo", "--model=/nonexistent/Qwen2.5-VL-7B-Instruct"], ["--model", "/nonexistent", "config.json"]),
    (["--mode=grpo", "--train_data=hpdv3:/x.json"], ["--train_data", "hpdv2"]),
    (["--mode=grpo", "--train_data=hpdv2:/nonexistent.json"], ["--train_data", "/nonexistent.json"]),
])
def test_train_refuses_bad_options(argv, words, capsys):
    refused(train.parse_args, argv, capsys, *words)


@pytest.mark.parametrize("argv, words", [
    (["--k", "0"], ["--k", "0", ">= 1"]),
    (["--batch-size", "0"], ["--batch_size", "0"]),
    (["--judge-batch-size=0"], ["--judge_batch_size"]),
    (["--anchor=-2"], ["--anchor", "-2"]),
    (["--top_p=0"], ["--top_p"]),
    (["--model", "/nonexistent"], ["--model", "/nonexistent"]),
    (["--data", "imagereward:/nonexistent/test.json"], ["--data", "/nonexistent/test.json"]),
    (["--prompt", "a fox", "--images", "/nonexistent.png", "/nonexistent2.png"], ["--images", "exist"]),
    (["--prompt", "a fox", "--images", "a.png"], ["--images", "two"]),
])
def test_evaluate_refuses_bad_options(argv, words, capsys):
    refused(evaluate.parse_config, argv, capsys, *words)


def test_misuse_with_a_real_checkpoint(real_checkpoint, tmp_path, capsys):
    """The demo ignores --model and the data flags; a checkpoint never trains or is scored on toy data unless
    asked for by name (--train_data=toy)."""
    model = f"--model={real_checkpoint}"
    refused(train.parse_args, [model], capsys, "--mode=demo", "--model", "--mode=grpo")
    refused(train.parse_args, ["--train_data=toy"], capsys, "--mode=demo", "--train_data")
    refused(train.parse_args, ["--mode=grpo", model], capsys, "--train_data", "toy")
    train_json = tmp_path / "train.json"
    train_json.write_text("[]")
    cfg = train.parse_args(["--mode=grpo", model, f"--train_data=hpdv2:{train_json}"])
    assert cfg.eval_data == "" and trainer.heldout_examples(cfg) == []  # no held-out evaluation, never toy data
    refused(evaluate.parse_config, [model], capsys, "--data")


def test_pickled_weights_are_refused(real_checkpoint, tmp_path, capsys):
    """A checkpoint holding only pytorch_model.bin is refused for --model, --listener and --judge; from_pretrained
    is called with use_safetensors=True besides."""
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (pickled / name).write_bytes((real_checkpoint / name).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    refused(train.parse_args, ["--mode=sft", f"--model={pickled}"], capsys, "--model", "safetensors")
    refused(train.parse_args, ["--mode=grpo", f"--listener={pickled}"], capsys, "--listener", "safetensors")
    refused(evaluate.parse_config, ["--judge", str(pickled)], capsys, "--judge", "safetensors")
    with pytest.raises(OSError):
        evaluate.load_reasoner(str(pickled), evaluate.Config())


def test_option_checks_are_declared_once():
    """cli.check reads each field's declared range: the dataclass is the one place an option is defined."""
    bad = dataclasses.replace(train.Config(), keep_last=0)
    with pytest.raises(cli.OptionError, match="--keep_last=0"):
        cli.check(bad)
