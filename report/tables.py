"""Tables and figures: an evaluation's numbers laid out as the paper shows them, and written to disk.

`markdown_tables` lays a report (the dict `evaluate.run` builds) out like tables 2-5 and the data of figures
2-3; `write_figures` draws figures 2-4 as PNGs with `line_plot`, and `panels_plot` the toy demo's learning
curves, small line charts drawn with PIL; `write_outputs` writes results.json, results.md, rollouts.jsonl (one
line per comparison) and the figures, `write_ratings` the same for the absolute-score evaluation (ratings.jsonl,
one line per image).

Tests: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown_tables(report: dict) -> str:
    """The report as markdown tables laid out like the paper's tables 2-5 (and the data of figures 2-3)."""
    if report.get("scoring") == "absolute":
        name, k, acc = Path(report["model"]).name or report["model"], report["k"], report["accuracy"]
        lines = [f"# {name} on {report['data']} (absolute scores, eq. (3))", "",
                 f"{report['records']} records, {report['images']} images rated, k = {k}", "",
                 "## Table 3: accuracy", ""]
        return "\n".join(lines + _table(["Method", "Accuracy (%)", "Pairs"],
                                         [[f"{name} (abs score), Mean@{j}", _pct(acc[f"mean@{j}"]["accuracy"]),
                                           acc[f"mean@{j}"]["pairs"]] for j in range(1, k + 1)])) + "\n"
    name, k, acc = Path(report["model"]).name or report["model"], report["k"], report["accuracy"]
    orders = [""] + ([" both orders"] if "mean@1 both orders" in acc else [])
    mk = lambda o: acc[f"mean@{k}" + o]  # Mean@k accuracy of one order setting
    lines = [f"# {name} on {report['data']}", "",
             f"{report['records']} records, {report['comparisons']} comparisons, k = {k}, "
             f"{_pct(report['well_formed'])}% of rollouts well formed, ECE {report['ece']:.3f}", "",
             "## Table 2: Mean@1 vs Mean@k (and majority vote)", ""]
    lines += _table(["Model", "Mean@1 (%)", f"Mean@{k} (%)", f"Vote@{k} (%)"],
                    [[name + o, _pct(acc["mean@1" + o]["accuracy"]), _pct(mk(o)["accuracy"]),
                      "-" if o else _pct(acc[f"vote@{k}"]["accuracy"])] for o in orders])
    lines += ["", "## Table 3: accuracy", ""]
    if report["layout"] == "groups":
        lines += _table(["Method", "Accuracy (%)", "Macro (%)", "Prompts", "Pairs"],
                        [[f"{name}{o}, Mean@{k}", _pct(mk(o)["micro"]), _pct(mk(o)["macro"]), mk(o)["prompts"],
                          mk(o)["pairs"]] for o in orders])
    else:
        binar = report.get("binarized", {})
        b = lambda o: binar.get(f"mean@{k}" + o, {"accuracy": None, "pairs": "-"})
        lines += _table(["Method", "Accuracy (%)", "Pairs", "Binarized (%)", "Binarized pairs"],
                        [[f"{name}{o}, Mean@{k}", _pct(mk(o)["accuracy"]), mk(o)["pairs"], _pct(b(o)["accuracy"]),
                          b(o)["pairs"]] for o in orders])
    if "contradiction" in report:
        c = report["contradiction"]
        lines += ["", "## Table 4: contradictions (the judge says the answer contradicts the reasoning)", ""]
        lines += _table(["Model", "Contradictory Examples (%)", "Judged rollouts"],
                        [[name, _pct(c["rate"]), c["judged"]]])
    if "no_thinking" in report:
        lines += ["", '## Table 5: reasoning replaced by "I have finished thinking."', ""]
        lines += _table(["Model", "Accuracy (%)", "Pairs"],
                        [[f"{name} {row}", f"{_pct(v['accuracy'])} ± {_pct(v['pm95'])}", v["pairs"]]
                         for row, v in report["no_thinking"].items()])
    if "by_agreement" in report:
        lines += ["", f"## Figure 3: accuracy by human agreement (Mean@{k})", ""]
        lines += _table(["Winner's share >= (%)", "Pairs", "Accuracy (%)"],
                        [[r["threshold"], r["pairs"], _pct(r["accuracy"])]
                         for r in report["by_agreement"][f"mean@{k}"]])
    if "disagreement" in report:
        lines += ["", "## Figure 2: accuracy by listener-reasoner distance (per rollout)", ""]
        lines += _table(["Distance", "Rollouts", "Accuracy (%)"],
                        [[f"{b['low']:.2f}-{b['high']:.2f}", b["n"], _pct(b["accuracy"])]
                         for b in report["disagreement"]["bins"]])
    return "\n".join(lines) + "\n"


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
              size: tuple[int, int] = (640, 420)) -> None:
    """A line chart on y in [0, 1] with markers, drawn with PIL: name -> (xs, ys); None ys skipped. The legend
    sits below the chart, where it hides no line."""
    panels_plot(path, title, xlabel, {ylabel: series}, columns=1, panel_size=size)


def panels_plot(path: Path, title: str, xlabel: str, panels: dict[str, dict[str, tuple[list, list]]],
                columns: int = 2, panel_size: tuple[int, int] = (460, 300)) -> None:
    """Charts side by side on y in [0, 1], one per panel (its title -> {series name -> (xs, ys)}), drawn with PIL.

    A series keeps its style in every panel (colour, line pattern and marker, by name), so one legend, below the
    panels, names them all; series that lie on one another stay distinguishable by pattern and marker.
    """
    from PIL import Image, ImageDraw, ImageFont
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    styles = {name: (COLOURS[n % len(COLOURS)], n % 2 == 1, ("circle", "square", "triangle")[n % 3])
              for n, name in enumerate(names)}
    rows = -(-len(panels) // columns)
    legend_height = 16 * len(names) + 10
    width, height = panel_size[0] * columns, 30 + panel_size[1] * rows + legend_height
    image, font = Image.new("RGB", (width, height), "white"), ImageFont.load_default(size=13)
    pen = ImageDraw.Draw(image)
    pen.text((10, 8), title, fill="black", font=font)
    for n, (panel, series) in enumerate(panels.items()):
        x, y = (n % columns) * panel_size[0], 30 + (n // columns) * panel_size[1]
        _chart(pen, font, (x, y, x + panel_size[0], y + panel_size[1]), panel, xlabel, series, styles)
    for n, name in enumerate(names):
        y = 30 + panel_size[1] * rows + 5 + 16 * n
        _stroke(pen, [(20, y + 6), (60, y + 6)], styles[name])
        pen.text((70, y), name, fill=styles[name][0], font=font)
    image.save(path)


def _chart(pen, font, box, title: str, xlabel: str, series: dict, styles: dict) -> None:
    """One chart inside `box` = (x0, y0, x1, y1) of the image: frame, ticks, title, the series in their styles."""
    left, top, right, bottom = box[0] + 50, box[1] + 22, box[2] - 15, box[3] - 40
    xs_all = sorted({x for xs, _ in series.values() for x in xs}) or [0, 1]
    x0, x1 = xs_all[0], (xs_all[-1] if xs_all[-1] > xs_all[0] else xs_all[0] + 1)
    at = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left), bottom - y * (bottom - top))
    pen.rectangle((left, top, right, bottom), outline="black")
    x_ticks = xs_all if len(xs_all) <= 11 else [x0 + i * (x1 - x0) / 4 for i in range(5)]
    for x in x_ticks:
        pen.text((at(x, 0)[0] - 8, bottom + 5), f"{x:.3g}", fill="black", font=font)
    for y in (0, 0.25, 0.5, 0.75, 1):
        pen.line((left - 4, at(x0, y)[1], left, at(x0, y)[1]), fill="black")
        pen.text((box[0] + 15, at(x0, y)[1] - 6), f"{y:.2f}", fill="black", font=font)
    pen.text((left, box[1] + 6), title, fill="black", font=font)
    pen.text(((left + right) // 2 - 30, bottom + 20), xlabel, fill="black", font=font)
    for name, (xs, ys) in series.items():
        xy = [at(x, y) for x, y in zip(xs, ys) if y is not None]
        _stroke(pen, xy, styles[name])


def _stroke(pen, xy: list, style) -> None:
    """A polyline in `style` = (colour, dashed, marker), with the marker at every point."""
    colour, dashed, marker = style
    for (ax, ay), (bx, by) in zip(xy, xy[1:]):
        if not dashed:
            pen.line((ax, ay, bx, by), fill=colour, width=2)
            continue
        length = max(((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5, 1e-9)
        for s in range(0, int(length), 10):  # 6-pixel dashes, 4-pixel gaps
            e = min(s + 6, length)
            pen.line((ax + (bx - ax) * s / length, ay + (by - ay) * s / length,
                      ax + (bx - ax) * e / length, ay + (by - ay) * e / length), fill=colour, width=2)
    for cx, cy in xy:
        if marker == "circle":
            pen.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        elif marker == "square":
            pen.rectangle((cx - 3, cy - 3, cx + 3, cy + 3), outline=colour, width=2)
        else:
            pen.polygon([(cx, cy - 4), (cx - 4, cy + 3), (cx + 4, cy + 3)], outline=colour)


def write_figures(out: Path, report: dict) -> list[Path]:
    """Figure 2 (with a listener), figure 3 (with votes), figure 4 (always): PNGs under `out`."""
    k, acc, written = report["k"], report["accuracy"], []
    js = list(range(1, k + 1))
    series = {"Mean@j": (js, [acc[f"mean@{j}"]["accuracy"] for j in js]),
              "Majority vote@j": (js, [acc[f"vote@{j}"]["accuracy"] for j in js])}
    if "mean@1 both orders" in acc:
        series["Mean@j, both orders"] = (js, [acc[f"mean@{j} both orders"]["accuracy"] for j in js])
    written.append(out / "figure4_rollouts.png")
    line_plot(written[-1], "Figure 4: accuracy vs rollouts", "rollouts j", "accuracy", series)
    if "by_agreement" in report:
        series = {name: ([r["threshold"] for r in rows], [r["accuracy"] if r["pairs"] else None for r in rows])
                  for name, rows in report["by_agreement"].items() if name in ("mean@1", f"mean@{k}") or
                  name == f"mean@{k} both orders"}
        written.append(out / "figure3_agreement.png")
        line_plot(written[-1], "Figure 3: accuracy vs human agreement", "winner's vote share >= (%)", "accuracy",
                  series)
    if "disagreement" in report:
        bins = report["disagreement"]["bins"]
        written.append(out / "figure2_disagreement.png")
        line_plot(written[-1], "Figure 2: accuracy vs listener-reasoner distance", "L2 distance (bin centre)",
                  "accuracy", {"accuracy": ([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins])})
    return written


def finite(x):
    """The report with NaN and infinities as None (null): JSON has no NaN, and an undefined metric is unknown."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


# The files an evaluation writes into its --out folder (evaluate.py checks each can be, before anything loads).
OUTPUTS = ("results.json", "results.md", "rollouts.jsonl", "ratings.jsonl", "figure2_disagreement.png",
           "figure3_agreement.png", "figure4_rollouts.png")


def write_outputs(out: Path, report: dict, dataset, results: Sequence) -> None:
    """results.json (the report), results.md (tables), rollouts.jsonl (one line per comparison of `dataset`, an
    `data.DatasetPairs`, with its `evaluate.Comparison` from `results`), the figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    (out / "results.md").write_text(markdown_tables(report))
    with open(out / "rollouts.jsonl", "w") as f:
        labelled = set(dataset.labelled)
        for i, (pair, r) in enumerate(zip(dataset.compared, results)):
            images = [im if isinstance(im, str) else None for im in pair.images]  # paths; bytes are not written
            row = {"prompt": pair.prompt, "images": images, "label": pair.label, "labelled": i in labelled,
                   "votes": pair.votes, "p_b": r.p_b, "probs": r.probs, "answers": r.answers, "texts": r.texts}
            if r.reversed is not None:
                row["reversed"] = {"probs": r.reversed.probs, "answers": r.reversed.answers, "texts": r.reversed.texts}
            f.write(json.dumps(finite(row), allow_nan=False) + "\n")
    write_figures(out, report)


def write_ratings(out: Path, report: dict, items: Sequence, scores: Sequence[Sequence[float]]) -> None:
    """The absolute-score evaluation: results.json, results.md and ratings.jsonl (each image's k expected ratings)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    (out / "results.md").write_text(markdown_tables(report))
    with open(out / "ratings.jsonl", "w") as f:
        for item, s in zip(items, scores):
            f.write(json.dumps({"prompt": item.prompt, "image": item.image if isinstance(item.image, str) else None,
                                "expected_ratings": s}) + "\n")
