"""How far the sampler's log-probs are from the update pass's, in bf16 on this CPU, for each --decode: the toy model
and a checkpoint laid out like Qwen2.5-VL-7B-Instruct (tests/real_layout.py), two GRPO steps each
(`old_logp_gap_mean` / `old_logp_gap_max` of metrics.jsonl, train.py's departure 2).

    .venv/bin/python bench/old_logp_gap.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

COMMON = ["--mode=grpo", "--precision=bf16", "--steps=2", "--group_size=4", "--pairs_per_rank=2", "--max_new_tokens=24",
          "--eval_pairs=0", "--temperature=1.0", "--save_every=100"]


def main() -> None:
    import real_layout
    tmp = Path(tempfile.mkdtemp(prefix="old_logp_gap_"))
    models = {"toy": ["--model=toy"],
              "7B layout": [f"--model={real_layout.build(tmp / 'Qwen2.5-VL-7B-Instruct')}", "--train_data=toy",
                            "--max_pixels=3136"]}
    print(f"{'model':<12}{'decode':<12}{'gap mean':>12}{'gap max':>12}   (per step)")
    for name, options in models.items():
        for decode in ("reference", "static", "compiled"):
            out = tmp / f"{name.replace(' ', '_')}_{decode}"
            run = subprocess.run([sys.executable, str(ROOT / "train.py"), *COMMON, *options, f"--decode={decode}",
                                  f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True)
            if run.returncode:
                print(f"{name:<12}{decode:<12} failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            means = " ".join(f"{r['old_logp_gap_mean']:.1e}" for r in rows)
            maxima = " ".join(f"{r['old_logp_gap_max']:.1e}" for r in rows)
            print(f"{name:<12}{decode:<12}{means:>12}   {maxima}", flush=True)


if __name__ == "__main__":
    main()
