"""The paper's numbers and how they are shown: metrics.py (scores and human labels -> accuracies, calibration,
the subsets of tables 4-5), judge.py (table 4's contradiction judge), heldout.py (the greedy held-out verdicts of
the learning curves), tables.py (tables 2-5 as markdown, figures 2-4 and the learning curves as PNGs, the output
files)."""
