"""One command line for train.py and evaluate.py (infra/cli.py): spellings, --help, and every bad option refused
before anything loads, with a message naming the option, the value and what is allowed: the paths a script will
write (an existing file where a folder goes, a folder where a file goes, a path under a file, a read-only place),
the datasets and folders it will read, a checkpoint whose config.json does not fit its weights."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra import cli
from models import families
from models.processor import Processor

import evaluate
import reward_model
import train
from infra import trainer
from test_checkpoint import small_disk_available  # `unshare -rm` works: a mount namespace of our own

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


# ---------------------------------------------------------------- numbers that mean nothing, options that do not mix


@pytest.mark.parametrize("argv, words", [
    (["--clip_low=1.5"], ["--clip_low=1.5", "< 1.0"]),
    (["--clip_low=1"], ["--clip_low=1.0", "< 1.0"]),
    (["--clip_high=-0.1"], ["--clip_high", ">= 0"]),
    (["--w_acc=-1"], ["--w_acc=-1.0", ">= 0"]),
    (["--w_list=inf"], ["--w_list=inf", "finite"]),
    (["--w_fmt=-0.5"], ["--w_fmt"]),
    (["--mode=grpo", "--w_fmt=0", "--w_acc=0", "--w_list=0"], ["--w_acc=0.0", "at least one reward"]),
    (["--seed=-1"], ["--seed=-1", ">= 0"]),
    (["--seed=18446744073709551616"], ["--seed", "<= 9223372036854775807"]),
    (["--max_prompt_tokens=0"], ["--max_prompt_tokens=0", ">= 1"]),
    (["--beta=-0.01"], ["--beta"]),
    (["--top_p=1.5"], ["--top_p", "<= 1.0"]),
])
def test_train_refuses_meaningless_numbers(argv, words, capsys):
    refused(train.parse_args, argv, capsys, *words)


def test_every_numeric_option_has_a_declared_range():
    """Each int or float option of both scripts declares a lower bound (what is below it means nothing)."""
    for config in (train.Config, evaluate.Config):
        for f in dataclasses.fields(config):
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                assert f.metadata.get("min") is not None or f.metadata.get("above") is not None, f"{config}: {f.name}"


@pytest.mark.parametrize("extra, words", [
    (["--data", "imagereward:test.json"], ["--data='imagereward:test.json' is not allowed: expected no --data with "
                                           "--prompt (--prompt scores the --images files for one prompt; --data is an "
                                           "option of a dataset evaluation)"]),
    (["--data", "imagereward:test.json", "--limit", "3"], ["--data='imagereward:test.json'", "no --data, --limit with "
                                                           "--prompt", "are options of a dataset evaluation"]),
    (["--limit", "3"], ["--limit", "with --prompt"]),
    (["--skip_bad"], ["--skip_bad", "with --prompt"]),
    (["--scoring", "absolute"], ["--scoring", "with --prompt"]),
])
def test_evaluate_refuses_prompt_with_dataset_options(tmp_path, extra, words, capsys):
    images = []
    for i in range(2):
        images.append(str(tmp_path / f"{i}.png"))
        (tmp_path / f"{i}.png").write_bytes(b"")
    message = refused(evaluate.parse_config, ["--prompt", "a fox", "--images", *images, *extra], capsys, *words)
    assert "pass one or the other" in message


def test_evaluate_refuses_a_prompt_over_the_limit(tmp_path, capsys):
    from PIL import Image
    images = [str(tmp_path / f"{i}.png") for i in range(2)]
    for path in images:
        Image.new("RGB", (56, 56), "red").save(path)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--prompt", "a red circle " * 400, "--images", *images, "--max_prompt_tokens=100"])
    assert "--prompt='a red circle a red circle" in str(stop.value) and \
        "expected a prompt of at most 100 tokens (--max_prompt_tokens), got 1201 tokens" in str(stop.value)


def test_prompt_limit_must_fit_the_models_context(real_checkpoint, capsys):
    model = f"--model={real_checkpoint}"
    refused(train.parse_args, ["--mode=sft", model, "--train_data=toy", "--max_prompt_tokens=127600"], capsys,
            "--max_prompt_tokens=127600", "at most 127488", "context is 128000 tokens", "--max_new_tokens=512")
    refused(evaluate.parse_config, [model, "--data=imagereward:x", "--max_prompt_tokens=127600"], capsys,
            "--max_prompt_tokens=127600", "at most 127488")
    refused(reward_model_parse, [model, f"--input={real_checkpoint / 'config.json'}", "--out=scores.jsonl",
                                 "--max_prompt_tokens=127600"], capsys, "--max_prompt_tokens=127600", "at most 127488")


# ---------------------------------------------------------------- checkpoints given by the user, broken


def edited_json(name, change):
    def damage(d):
        (d / name).write_text(json.dumps(change(json.loads((d / name).read_text()))))
    return damage


def truncated(name, size=None):
    def damage(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:len(data) // 2 if size is None else size])
    return damage


def removed(*names):
    def damage(d):
        for n in names:
            (d / n).unlink()
    return damage


BROKEN_CHECKPOINTS = {  # name -> (damage, words of the refusal, also refused as the judge's)
    "another family's config.json": (edited_json("config.json", lambda c: dict(c, model_type="llama")),
                                     "config.json: model_type 'llama' is not one of the families this code runs", False),
    "another size's config.json": (edited_json("config.json", lambda c: dict(c, hidden_size=64)),
                                   "model-00001-of-00002.safetensors: model.embed_tokens.weight has shape [152064, 32], "
                                   "but config.json gives vocab_size x hidden_size = [152064, 64]: config.json belongs "
                                   "to another model", True),
    "config.json not JSON": (truncated("config.json"), "config.json: not a JSON config", True),
    "empty weights": (truncated("model-00001-of-00002.safetensors", 0),
                      "model-00001-of-00002.safetensors has 0 bytes, too few for a safetensors header", True),
    "truncated weights": (truncated("model-00001-of-00002.safetensors"),
                          "model-00001-of-00002.safetensors has 9752252 bytes, its header describes 19504504: "
                          "truncated", True),
    "truncated header": (truncated("model-00002-of-00002.safetensors", 100),
                         "model-00002-of-00002.safetensors: its header claims", True),
    "a shard missing": (removed("model-00002-of-00002.safetensors"),
                        "model-00002-of-00002.safetensors is missing (model.safetensors.index.json names it)", True),
    "tokenizer files removed": (removed("tokenizer.json", "tokenizer_config.json", "chat_template.json"),
                                "no tokenizer files (expected tokenizer.json", True),
    "chat template removed": (lambda d: (removed("chat_template.json")(d), edited_json(
        "tokenizer_config.json", lambda c: {k: v for k, v in c.items() if k != "chat_template"})(d)),
        "no chat template (expected chat_template.jinja", True),
    "tokenizer.json cut short": (truncated("tokenizer.json"), "tokenizer.json is empty or cut short", True),
    "no image processor": (removed("preprocessor_config.json"), "preprocessor_config.json is missing", False),
    "image processor config nested too deep": (lambda d: (d / "preprocessor_config.json").write_text("[" * 5000),
                                               "preprocessor_config.json: not a JSON config (maximum recursion", False),
    "no vision_config": (edited_json("config.json", lambda c: {k: v for k, v in c.items() if k != "vision_config"}),
                         "config.json: no vision_config (the vision tower's sizes): transformers would build a "
                         "default-size one", False),
    "another vision depth": (edited_json("config.json", lambda c: dict(c, vision_config=dict(c["vision_config"],
                                                                                             depth=32))),
                             "config.json: vision_config's depth is 32, but the weights hold 2 vision blocks", True),
    "another number of layers": (edited_json("config.json", lambda c: dict(c, num_hidden_layers=28)),
                                 "config.json: num_hidden_layers is 28, but the weights hold 2 decoder layers", True),
}


@pytest.fixture
def broken_copy(real_checkpoint, tmp_path):
    def make(case):
        d = tmp_path / case.replace(" ", "_").replace("'", "")
        shutil.copytree(real_checkpoint, d)
        BROKEN_CHECKPOINTS[case][0](d)
        return d
    return make


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_a_broken_checkpoint_is_refused_naming_its_file(broken_copy, case, capsys):
    """--model, --listener, evaluate's --model and --judge: refused before anything loads, naming the option, the
    directory, the file and what is wrong; loading it anyway (models/families.py) says the same."""
    d = broken_copy(case)
    _, words, judge_too = BROKEN_CHECKPOINTS[case]
    refused(train.parse_args, ["--mode=sft", f"--model={d}", "--train_data=toy"], capsys, f"--model='{d}'", words)
    refused(train.parse_args, ["--mode=grpo", f"--listener={d}", "--train_data=toy"], capsys, "--listener", words)
    refused(evaluate.parse_config, ["--model", str(d), "--data=imagereward:x"], capsys, "--model", words)
    if judge_too:
        refused(evaluate.parse_config, ["--judge", str(d)], capsys, f"--judge='{d}'", words)
    with pytest.raises(OSError, match=re.escape(f"{d}: ") + ".*" + re.escape(words)):
        families.load(d, torch.float32)


def test_what_the_cheap_check_cannot_see_still_names_the_directory(broken_copy, real_checkpoint, tmp_path):
    """A deeper layer of another size (config.json's intermediate_size changed): transformers' own refusal is
    raised as the directory's; a tokenizer whose chat template is empty is named by the processor."""
    d = broken_copy("config.json not JSON")
    (d / "config.json").write_text(json.dumps(dict(json.loads((real_checkpoint / "config.json").read_text()),
                                                   intermediate_size=96)))
    with pytest.raises(OSError, match=re.escape(f"{d}: the weights do not have the shapes config.json gives")):
        families.load(d, torch.float32)
    with pytest.raises(OSError, match=re.escape(f"{d}: no tokenizer files")):
        (d / "tokenizer.json").unlink()
        Processor.from_pretrained(str(d))


def test_a_qwen3_config_without_its_nested_configs_is_refused(qwen3_checkpoint, tmp_path, capsys):
    """Qwen3-VL's config.json nests the sizes: without vision_config (or text_config) transformers would build a
    default-size model (Qwen3-VL-8B's vision tower, or its whole language model) before finding the weights do not
    fit. The field is named before anything is built."""
    for field in ("vision_config", "text_config"):
        d = tmp_path / field
        d.mkdir()
        for f in qwen3_checkpoint.iterdir():  # the weights linked, not copied
            (d / f.name).symlink_to(f)
        (d / "config.json").unlink()
        config = json.loads((qwen3_checkpoint / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != field}))
        refused(train.parse_args, ["--mode=sft", f"--model={d}", "--train_data=toy"], capsys,
                f"--model='{d}'", f"config.json: no {field}")
        with pytest.raises(OSError, match=f"config.json: no {field}"):
            families.load(d, torch.float32)


# ---------------------------------------------------------------- paths a script writes: checked before anything loads


@pytest.fixture
def places(tmp_path):
    """A file, a folder, and a JSONL input for reward_model.py."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "p", "images": ["a.png", "b.png"]}) + "\n")
    return tmp_path


def reward_model_parse(argv):
    return cli.parse(reward_model.Config, argv)


OUTPUTS = [  # (script, its arguments with {t} for the folder of `places`, words of the refusal)
    (train.parse_args, ["--out_dir={t}/a_file"], "expected a folder to write into ({t}/a_file is a file)"),
    (train.parse_args, ["--out_dir={t}/a_file/run"], "expected a path under folders ({t}/a_file is a file)"),
    (train.parse_args, ["--mode=demo", "--out_dir={t}/a_file"], "a folder to write into"),
    (evaluate.parse_config, ["--out={t}/a_file"], "expected a folder to write into ({t}/a_file is a file)"),
    (evaluate.parse_config, ["--out={t}/a_file/eval"], "expected a path under folders"),
    (evaluate.parse_config, ["--out={t}"],
     "a folder where rollouts.jsonl can be written ({t}/rollouts.jsonl is a folder)"),
    (reward_model_parse, ["--input={t}/in.jsonl", "--out={t}/a_folder"], "expected a file to write ({t}/a_folder is a "
                                                                          "folder)"),
    (reward_model_parse, ["--input={t}/in.jsonl", "--out={t}/a_file/out.jsonl"], "a path under folders"),
    (reward_model_parse, ["--input={t}/in.jsonl", "--out={t}/scores.jsonl"],
     "--out='{t}/scores.jsonl.options.json' is not allowed: expected a file to write"),
]


@pytest.mark.parametrize("case", range(len(OUTPUTS)))
def test_an_output_path_that_cannot_be_written_is_refused_before_anything_loads(places, case, capsys):
    """Each script's output, wrong in each way, is refused as the options are read: before the models load, not
    at the end of the evaluation or the run that would have written it."""
    parse, argv, words = OUTPUTS[case]
    (places / "rollouts.jsonl").mkdir(exist_ok=True)  # where evaluate.py would write a file
    (places / "scores.jsonl.options.json").mkdir(exist_ok=True)  # where reward_model.py keeps its options
    refused(parse, [a.format(t=places) for a in argv], capsys, words.format(t=places))


@pytest.mark.skipif(not small_disk_available(), reason="needs `unshare -rm` (a user and mount namespace)")
def test_a_read_only_output_is_refused_before_anything_is_read(tmp_path):
    """On a read-only filesystem (a tmpfs mounted read-only in a mount namespace: even root cannot write there),
    data.py check's --out is refused as the arguments are read, by the check (cli.check_output) every script's
    output goes through (the cases above show each script calls it)."""
    dataset, ro = tmp_path / "train.json", tmp_path / "ro"
    dataset.write_text("[]")
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && "
              f"{sys.executable} data.py check hpdv2:{dataset} --out {ro}/bad.jsonl; echo status=$?")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    out = result.stdout + result.stderr
    assert "status=2" in out, out
    assert f"--out='{ro}/bad.jsonl' is not allowed: expected a path this process can write to ({ro} is read-only" in out


# ---------------------------------------------------------------- what is read: empty values, folders, files


@pytest.mark.parametrize("case", ["train out_dir", "train model", "evaluate prompt", "evaluate model", "evaluate out",
                                  "reward_model input", "reward_model model"])
def test_an_option_given_empty_is_refused(places, case, capsys):
    """An empty value is not the option left out: `--out_dir=""` would write into the current folder, `--prompt ""`
    fell into a dataset evaluation and spoke of --data, `--model ""` loaded the current folder."""
    script, name = case.split()
    parse = {"train": train.parse_args, "evaluate": evaluate.parse_config, "reward_model": reward_model_parse}[script]
    extra = [f"--out={places}/s.jsonl"] if script == "reward_model" and name != "out" else []
    extra += [f"--input={places}/in.jsonl"] if script == "reward_model" and name != "input" else []
    message = refused(parse, [f"--{name}", "", *extra], capsys,
                      f"--{name}='' is not allowed: expected a non-empty value")
    assert "--data" not in message


def test_evaluate_names_what_is_wrong_with_its_inputs(places, capsys):
    """An --images entry that is a folder is said to be one (not "does not exist"); a dataset's image root that is
    not a folder, and an --exclude file that does not exist, are refused as the options are read."""
    image = places / "a.png"
    image.write_bytes(b"")
    refused(evaluate.parse_config, ["--prompt", "a fox", "--images", str(image), str(places / "a_folder")], capsys,
            f"image files that exist ({places / 'a_folder'} is a folder)")
    data = places / "test.json"
    data.write_text("[]")
    refused(evaluate.parse_config, ["--data", f"imagereward:{data}", "--images", str(places / "a_file")], capsys,
            "--images=", "the image root of --data, a folder", "is a file")
    refused(evaluate.parse_config, ["--data", f"imagereward:{data}", "--exclude", str(places / "missing.jsonl")],
            capsys, "--exclude=", "the file `python data.py check` writes")


def test_a_dataset_spec_is_checked_for_its_kind_of_path(places, capsys):
    """hpdv2 and the imagereward test.json read one JSON file: a folder is refused naming it, not left to raise
    IsADirectoryError; a parquet folder must hold parquet files; an image root must be a folder."""
    sft = ["--mode=sft"]
    refused(train.parse_args, [*sft, f"--train_data=hpdv2:{places / 'a_folder'}"], capsys,
            f"a JSON file for hpdv2 ({places / 'a_folder'} is a folder)")
    refused(train.parse_args, [*sft, f"--train_data=imagereward:{places / 'a_folder'}"], capsys, "a JSON file")
    refused(train.parse_args, [*sft, f"--train_data=rapidata:{places / 'a_folder'}"], capsys,
            f"parquet files, or folders holding them ({places / 'a_folder'} is a folder with no *.parquet file)")
    refused(train.parse_args, [*sft, f"--train_data=hpdv2:{places / 'a_file'}", f"--train_images={places / 'a_file'}"],
            capsys, "--train_images=", "the image root of --train_data, a folder", "is a file")


def test_api_values_are_checked_by_their_declared_type():
    """cli.value_problem also checks the type a value of the Python API may get wrong (the command line's are
    typed by argparse): a bool for an int, a string for a float, NaN."""
    fields = {f.name: f for f in dataclasses.fields(reward_model.Config)}
    def problem(name, value):
        return cli.value_problem(value, fields[name].metadata, fields[name].default)
    assert problem("k", True) == "an int, not a bool" and problem("k", 2.0) == "an int, got float"
    assert problem("temperature", "hot") == "a float, got str"
    assert problem("temperature", float("nan")) == "a finite number"
    assert problem("both_orders", 1) == "true or false" and problem("decode", "fast").startswith("one of reference")
    assert problem("temperature", 1) is None and problem("k", 3) is None and problem("both_orders", False) is None
