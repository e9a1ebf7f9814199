"""bench/gpu_check.py, the first GPU's ten minutes, run here at its smallest (`--device=cpu --quick`), so that it
cannot rot before a GPU comes: every part runs, and what each reports holds on this CPU.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECKS = ["greedy sampling vs model.generate", "static decode vs reference decode (G=3)",
          "compiled decode vs reference decode (G=3)", "shared-prompt vs repeated-prompt log-probs",
          "shared-prompt vs repeated-prompt gradients", "listener from the reference pass vs its own pass"]


def test_gpu_check_on_the_cpu(tmp_path):
    """`python bench/gpu_check.py --device=cpu --quick` exits 0 and writes both reports, which say it is a CPU run:
    (a) every fast path equals its reference in bf16 within its tolerance; (b) the toy GRPO step ran on 2 gloo
    processes and its old_logp gap is a number or "absent"; (c) the reference and static decodes were timed (the
    compiled one is left out of --quick), with no floor multiple, which is a GPU's; (d) the real step's update phase
    within 10% of the rehearsal's prediction (tests/test_rehearsal.py's bound), as the rehearsal's ledger counts it
    (no CUDA allocator here)."""
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--device=cpu", "--quick", f"--out={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cpu_run"] and "A CPU run" in (tmp_path / "report.md").read_text()
    assert all(report[part]["status"] == "ok" for part in ("equivalence", "toy_grpo", "decode", "update"))
    rows = report["equivalence"]["result"]
    assert [r["check"] for r in rows] == CHECKS
    assert all(r["passed"] and r["max_abs_diff"] <= r["tolerance"] for r in rows), rows
    grpo = report["toy_grpo"]
    assert (grpo["processes"], grpo["backend"], len(grpo["steps"])) == (2, "gloo", 1)
    assert all(isinstance(s[k], float) or s[k] == "absent" for s in grpo["steps"]
               for k in ("old_logp_gap_mean", "old_logp_gap_max"))
    decodes = report["decode"]["result"]["decodes"]
    assert [d["decode"] for d in decodes] == ["reference", "static"]  # --quick: the compiled step is (a)'s
    assert all(d["step_s"] > 0 and d["floor_multiple"] is None and d["graphs"] == 0 for d in decodes)
    update = report["update"]
    real, predicted = update["result"]["ledger_gib"]["update"], update["predicted_gib"]["update"]
    assert abs(real / predicted - 1) <= 0.10 and update["result"]["allocated_gib"] == {}
