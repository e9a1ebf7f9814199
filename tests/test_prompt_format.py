"""The prompt format travels with a checkpoint (prompt.py's prompt_format.json): read strictly, refused at start
when its answers are not one token each of the checkpoint's tokenizer, written by train.py into every checkpoint
and export, read back by evaluate.py and `RewardModel.from_pretrained` (changing what they ask), a changed one
refused on resume; a checkpoint without the file (every one trained before it existed) is asked in `PROMPT`.

One SFT step of the toy model runs in this process, on a toy dataset of 8 pairs written here; what the model
is asked is read off the token ids the sampler receives, decoded.
Run: .venv/bin/python -m pytest -q tests/test_prompt_format.py
"""
import dataclasses
import gc
import json
import shutil
import signal
import warnings

import pytest
import torch

import evaluate
import reward_model
import train
from infra import checkpoint, trainer
from models.prompt_format import FORMAT_FILE, FormatError, checkpoint_format, format_json, read_format
from prompt import PROMPT, PromptFormat
from reward_model import RewardModel
from toy import world

# Another question, other answer words (one byte-level token each in the toy tokenizer), PROMPT's tags.
ASKED = PromptFormat(question="Prompt: {prompt}\nWhich picture wins? Think inside <think> </think>, then answer "
                              "A or B inside <answer> </answer>.", answers=("A", "B"))


def write(path, fields) -> str:
    path.write_text(json.dumps(fields))
    return str(path)


def asked(fmt: PromptFormat) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(fmt).items()}


# ---------------------------------------------------------------- the file, read strictly


def test_a_format_file_round_trips_and_a_partial_one_keeps_prompts_fields(tmp_path):
    full = tmp_path / "full.json"
    full.write_text(format_json(ASKED))
    assert read_format(full) == ASKED and json.loads(full.read_text()) == asked(ASKED)
    assert read_format(write(tmp_path / "part.json", {"answers": ["A", "B"]})) == PromptFormat(answers=("A", "B"))


@pytest.mark.parametrize("fields, words", [
    ({"answer": ["A", "B"]}, "unknown field 'answer'"),
    ({"answers": "AB"}, "field 'answers': expected a list of two different non-empty words"),
    ({"answers": ["A", "A"]}, "field 'answers': expected a list of two different"),
    ({"answers": ["A", " B"]}, "field 'answers'"),
    ({"question": "Which image is better?"}, "field 'question': expected a string holding {prompt}"),
    ({"question": "Prompt: {prompt} {style}"}, "field 'question'"),
    ({"think_open": ""}, "field 'think_open': expected a non-empty string"),
    ({"between": 3}, "field 'between': expected a string, got 3"),
    ({"ratings": ["0", "1", "2"]}, "field 'ratings': expected the ratings \"1\", \"2\", ..., \"R\""),
    (["A", "B"], "expected a JSON object of PromptFormat's fields"),
])
def test_a_bad_format_file_is_named_with_its_field(tmp_path, fields, words):
    path = write(tmp_path / "bad.json", fields)
    with pytest.raises(FormatError) as error:
        read_format(path)
    assert str(error.value).startswith(f"{path}: ") and words in str(error.value), str(error.value)
    (tmp_path / "cut.json").write_text('{"answers": ["A", ')
    with pytest.raises(FormatError, match="cut.json: not a readable JSON file"):
        read_format(tmp_path / "cut.json")


def refused(parse, argv, capsys, *words):
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert all(w in message for w in words), (words, message)


def test_answers_that_are_not_one_token_are_refused_at_start(tmp_path, capsys):
    """Each script refuses, before anything loads, a format whose answer (or rating) the toy tokenizer writes as
    several tokens, naming the answer; a bad file is named with its field; the demo takes no format."""
    bad = write(tmp_path / "words.json", {"answers": ["first image", "B"]})
    words = ["--prompt_format=", "words.json", "one token each of --model's tokenizer (toy)", "answer 'first image'"]
    refused(evaluate.parse_config, ["--prompt_format", bad], capsys, *words)
    refused(train.parse_args, ["--mode=sft", "--prompt_format", bad], capsys, *words)
    (tmp_path / "in.jsonl").write_text("")
    scorer = lambda argv: reward_model.cli.parse(reward_model.Config, argv)  # noqa: E731
    refused(scorer, ["--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--prompt_format", bad],
            capsys, *words)
    rating = write(tmp_path / "rating.json", {"ratings": ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]})
    refused(evaluate.parse_config, ["--prompt_format", rating], capsys, "answer '10' is not exactly one token")
    unknown = write(tmp_path / "unknown.json", {"wording": "x"})
    refused(evaluate.parse_config, ["--prompt_format", unknown], capsys, "unknown.json: unknown field 'wording'")
    refused(train.parse_args, ["--prompt_format", write(tmp_path / "ok.json", asked(ASKED))], capsys,
            "--mode=demo runs the toy world and ignores --prompt_format")


# ---------------------------------------------------------------- through a checkpoint and back


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One SFT step of the toy model asked in ASKED (this process, a group of one), saved and exported: the run's
    directory, its format file, the toy data, and what the step encoded."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("format_run")
    paths = world.write_dataset(root / "data", n_train=8, n_test=2, seed=0)
    fmt_file = root / "asked.json"
    fmt_file.write_text(json.dumps(asked(ASKED)))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # train.Stop replaces them
    seen = {"asked": [], "targets": []}  # what the SFT step encodes: the prompts, the target completions
    encode, targets = trainer.Trainer.encode, train.completion_tokens

    def recording_encode(self, examples):
        batch = encode(self, examples)
        seen["asked"] += self.processor.tokenizer.batch_decode(batch["input_ids"])
        return batch

    def recording_targets(tokenizer, texts, device):
        seen["targets"] += texts
        return targets(tokenizer, texts, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.Trainer, "encode", recording_encode)
        patch.setattr(train, "completion_tokens", recording_targets)
        train.train(train.parse_args(run_args(root / "run", fmt_file, paths)))
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    gc.collect()  # the finished run's Trainer, and with it its lock on out_dir
    return root / "run", fmt_file, paths, seen


def run_args(out, fmt_file, paths, steps=1):
    return ["--mode=sft", f"--train_data=hpdv2:{paths['train']}", f"--train_images={paths['train_images']}",
            f"--eval_data=imagereward:{paths['test']}", f"--eval_images={paths['test_images']}", "--pairs_per_rank=2",
            "--micro_pairs=2", f"--steps={steps}", "--save_every=1", "--max_new_tokens=4", "--eval_pairs=2",
            "--eval_every=0", "--warmup_steps=1", "--lr=1e-3", f"--prompt_format={fmt_file}", f"--out_dir={out}"]


class Asked(Exception):
    """Raised by the sampler stand-in of `asks`: what was asked is known, the rest of the run is skipped."""


def asks(monkeypatch, run) -> str:
    """The text of the first prompt the sampler receives while `run()` runs."""
    seen = []

    def sampler(model, batch, **kwargs):
        seen.append(evaluate.toy_processor().tokenizer.decode(batch["input_ids"][0]))
        raise Asked

    monkeypatch.setattr(evaluate, "sample", sampler)
    with pytest.raises(Asked):
        run()
    return seen[0]


def test_the_run_asks_in_the_format_and_writes_it_into_every_checkpoint_and_export(trained):
    """The SFT step asks ASKED's question and trains on completions answering A or B in ASKED's tags; the step
    directory (its manifest listing the file) and the export hold the format."""
    out, _, _, seen = trained
    assert seen["asked"] and all("Which picture wins?" in text for text in seen["asked"])
    assert seen["targets"] and all(t in (ASKED.completion("", "A"), ASKED.completion("", "B")) for t in seen["targets"])
    for directory in (out / "step_0000001", out / "export_0000001"):
        assert (directory / FORMAT_FILE).read_text() == format_json(ASKED), directory
    manifest = json.loads((out / "step_0000001" / "manifest.json").read_text())
    assert manifest["files"][FORMAT_FILE]["size"] == len(format_json(ASKED).encode())


def test_evaluate_and_the_reward_model_ask_an_export_in_its_format(trained, tmp_path, monkeypatch):
    """The export is asked ASKED's question by `evaluate.py --prompt` and by the reward model, with no option; the
    option overrides it with a warning naming the fields that differ; the same export without prompt_format.json
    is asked PROMPT's question."""
    out, _, paths, _ = trained
    export = out / "export_0000001"
    images = [str(p) for p in sorted((paths["test_images"]).rglob("*.png"))[:2]]
    prompt = "a red circle"
    command = ["--model", str(export), "--prompt", prompt, "--images", *images, "--max_new_tokens=4"]
    text = asks(monkeypatch, lambda: evaluate.rank_images(evaluate.parse_config(command)))
    assert ASKED.question.format(prompt=prompt) in text and "Which of the two images" not in text, text
    rm = RewardModel.from_pretrained(str(export), max_new_tokens=4)
    assert rm.fmt == ASKED
    assert ASKED.question.format(prompt=prompt) in asks(monkeypatch, lambda: rm.score(prompt, images))
    plain = write(tmp_path / "plain.json", asked(PROMPT))
    with pytest.warns(UserWarning, match=f"differs from {export / FORMAT_FILE}.* in question, answers: it is asked"):
        text = asks(monkeypatch, lambda: evaluate.rank_images(evaluate.parse_config(command + ["--prompt_format", plain])))
    assert PROMPT.question.format(prompt=prompt) in text
    bare = tmp_path / "bare"
    shutil.copytree(export, bare)
    (bare / FORMAT_FILE).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file, nothing to differ from: no warning
        assert checkpoint_format(str(bare)) is PROMPT and checkpoint_format(str(bare), plain) == PROMPT
    assert RewardModel.from_pretrained(str(bare), max_new_tokens=4).fmt is PROMPT
    command[1] = str(bare)
    assert PROMPT.question.format(prompt=prompt) in asks(
        monkeypatch, lambda: evaluate.rank_images(evaluate.parse_config(command)))


def test_a_resumed_run_refuses_a_changed_format(trained, tmp_path):
    """Resuming with another format is refused, naming the field, before any model loads; so is resuming with
    PROMPT a run asked in ASKED. A checkpoint written before formats were recorded (no prompt_format.json) is
    one trained in PROMPT: resuming it in PROMPT goes on, in ASKED is refused."""
    out, fmt_file, paths, _ = trained
    other = write(tmp_path / "other.json", asked(dataclasses.replace(ASKED, answers=("B", "A"))))
    with pytest.raises(SystemExit, match=r"prompt format \(prompt_format.json\) answers: \('A', 'B'\) -> \('B', 'A'\)"):
        train.train(train.parse_args(run_args(out, other, paths, steps=2)))
    gc.collect()  # the refused run's lock on out_dir, held by the frames of its traceback
    cfg = train.parse_args(run_args(out, fmt_file, paths, steps=2))
    with pytest.raises(SystemExit, match=r"prompt format \(prompt_format.json\) question: 'Prompt: \{prompt\}\\nWhich picture"):
        trainer.open_run(cfg, 0, 1, PROMPT)
    old = out.parent / "old"
    shutil.copytree(out / "step_0000001", old / "step_0000001")
    (old / "step_0000001" / FORMAT_FILE).unlink()
    manifest = json.loads((old / "step_0000001" / "manifest.json").read_text())
    del manifest["files"][FORMAT_FILE]
    (old / "step_0000001" / "manifest.json").write_text(json.dumps(manifest))
    cfg = dataclasses.replace(cfg, out_dir=str(old), prompt_format="")
    lock, resume, _ = trainer.open_run(cfg, 0, 1, PROMPT)
    assert resume == old / "step_0000001"
    lock.close()
    with pytest.raises(SystemExit, match="prompt format .* answers: \\('1', '2'\\) -> \\('A', 'B'\\)"):
        trainer.open_run(cfg, 0, 1, ASKED)
    assert checkpoint.config_differences({"prompt_format": "a.json", "pairs_per_rank": 2}, 1,
                                         {"prompt_format": "b.json", "pairs_per_rank": 2}, 1, {}) == []
