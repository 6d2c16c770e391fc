"""What `fish-peft compare` prints and writes to comparison.md: an aligned markdown table (mean ± std over the seeds,
the learning rate used, size and cost), which method is best on the main metric and whether its lead is larger than
the noise at this evaluation size, what the columns mean, and where every file went."""

from __future__ import annotations

import math
from typing import Any, Optional

from fish_peft.cli.lr_search import show_lr

COMBINED = "combined_score"
RIGHT, LEFT = ">", "<"


def lead(rows: list[dict], metric: str, higher_is_better: bool, evaluation_examples: Optional[int]) -> dict[str, Any]:
    """The best method on `metric` (means over seeds), the runner-up, the lead, and the noise it is set against:
    for accuracy, one run's binomial standard error sqrt(p(1-p)/n) at the best method's accuracy p; the seeds'
    standard deviations of the two methods; `noise` is the largest of these (None when none is known)."""
    ranked = sorted((r for r in rows if _known(r["metrics"].get(metric))), key=lambda r: r["metrics"][metric],
                    reverse=higher_is_better)
    if not ranked:
        return {"metric": metric, "best": None, "evaluation_examples": evaluation_examples}
    best = ranked[0]
    p = best["metrics"][metric]
    found = {"metric": metric, "higher_is_better": higher_is_better, "best": best["method"], "best_value": p,
             "evaluation_examples": evaluation_examples}
    se = math.sqrt(p * (1 - p) / evaluation_examples) if metric == "accuracy" and evaluation_examples and 0 <= p <= 1 else None
    stds = [r["metrics_std"].get(metric) for r in ranked[:2] if _known(r["metrics_std"].get(metric))]
    found.update(binomial_standard_error=se, seed_std=max(stds) if stds else None)
    known = [value for value in (se, *stds) if value is not None]
    found["noise"] = max(known) if known else None
    if len(ranked) > 1:
        second = ranked[1]
        found.update(second=second["method"], second_value=second["metrics"][metric],
                     lead=abs(p - second["metrics"][metric]))
        if found["noise"] is not None:
            found["lead_over_noise"] = found["lead"] / found["noise"] if found["noise"] > 0 else math.inf
    return found


def render(summary: dict[str, Any]) -> str:
    """The table, then the findings, the columns explained and the files, as comparison.md holds them."""
    rows = summary["rows"]
    metrics = shown_metrics(rows)
    parts = [aligned_table(rows, metrics), findings(summary), grid_edges(rows), columns(summary, metrics), files(summary)]
    return "\n\n".join(part for part in parts if part) + "\n"


def shown_metrics(rows: list[dict]) -> list[str]:
    """The metrics the table shows: every one of the runs', but combined_score where it only repeats the one metric
    (tasks with a single metric)."""
    names = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    return [n for n in names if n != COMBINED or len(names) > 2]


def aligned_table(rows: list[dict], metrics: list[str]) -> str:
    """A markdown table whose columns are padded to one width (text left, numbers right), so that it reads as a
    table in a terminal too."""
    several = any(len(row.get("runs", ())) > 1 for row in rows)
    header = ["method", *metrics, "lr", "batch", "trainable", "% of model", "saved", "step", "peak memory"]
    align = [LEFT] + [RIGHT] * (len(header) - 1)
    body = []
    for row in rows:
        cells = [row["method"]]
        cells += [_value(row["metrics"].get(m), row["metrics_std"].get(m) if several else None) for m in metrics]
        cells += [show_lr(row["lr"]), str(row["batch_size"]), f"{row['trainable_parameters']:,}",
                  f"{row['trainable_percent']:.3f}", _bytes(row["adapter_bytes"]), _seconds(row["mean_step_seconds"]),
                  _bytes(row["peak_memory_bytes"])]
        body.append(cells)
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == RIGHT else (":" + "-" * (w + 1)) for a, w in zip(align, widths)) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def findings(summary: dict[str, Any]) -> str:
    """Which method is best on the main metric, how large the noise is, and whether the lead is larger."""
    found, seeds = summary["lead"], summary["seeds"]
    metric = found["metric"]
    over = f"mean over seeds {_list(seeds)}" if len(seeds) > 1 else f"seed {seeds[0]}"
    if found["best"] is None:
        return f"No method has a {metric} value to rank by."
    what = "the task's main metric" if found["higher_is_better"] else "lower is better"
    text = [f"Best on {metric} ({what}; {over}): {found['best']}, {found['best_value']:.4f}."]
    if "second" not in found:
        return text[0]
    if found["lead"] == 0:
        text[0] = text[0][:-1] + f", tied with {found['second']}."
    else:
        text[0] = text[0][:-1] + (f", ahead of {found['second']} ({found['second_value']:.4f}) by {found['lead']:.4f}"
                                  f"{_points(found['lead'], metric)}.")
    n = found["evaluation_examples"]
    noise = []
    if found["binomial_standard_error"] is not None:
        se = found["binomial_standard_error"]
        noise.append(f"with {n:,} evaluation examples, one run's accuracy has a binomial standard error "
                     f"sqrt(p(1-p)/n) of {se:.4f} ({100 * se:.2f} points)")
    if found["seed_std"] is not None:
        noise.append(f"across the {len(seeds)} seeds the two methods' standard deviation is up to {found['seed_std']:.4f}")
    if not noise:
        text.append(f"Noise: not stated for {metric} with one seed (the binomial standard error is accuracy's; "
                    "--seeds 0,1,2 shows how much a classification recipe's methods move between seeds).")
        return " ".join(text)
    text.append(f"Noise at this evaluation size: {'; '.join(noise)}.")
    if found["lead"] == 0:
        return " ".join(text)
    ratio = found["lead_over_noise"]
    if ratio > 2:
        verdict = "more than twice that noise: a real difference at this evaluation size"
    elif ratio > 1:
        verdict = "larger than that noise but less than twice it: suggestive, not conclusive"
    else:
        verdict = f"not larger than that noise: at this evaluation size {found['best']} and {found['second']} are tied"
    text.append(f"The lead is {verdict}.")
    return " ".join(text)


def grid_edges(rows: list[dict]) -> str:
    """The methods whose chosen learning rate is the lowest or the highest of their grid: their best may lie beyond
    it. Empty when there are none (or no grid)."""
    edges = []
    for row in rows:
        tuning = row.get("tuning")
        grid = sorted({point["lr"] for point in tuning["scores"]}) if tuning else []
        if len(grid) > 1 and tuning["chosen_lr"] in (grid[0], grid[-1]):
            side = "lowest" if tuning["chosen_lr"] == grid[0] else "highest"
            edges.append(f"{row['method']} ({side}, {show_lr(tuning['chosen_lr'])})")
    if not edges:
        return ""
    return (f"At the edge of its grid: {', '.join(edges)}. The best learning rate may lie beyond it; widen the grid "
            "(lr_grid_by_method) and compare again.")


def columns(summary: dict[str, Any], metrics: list[str]) -> str:
    """One line for each column that is not obvious."""
    seeds, tuned = summary["seeds"], summary.get("lr_grid")
    lines = ["Columns:"]
    if len(seeds) > 1:
        lines.append(f"- metric ± std: mean over the {len(seeds)} seeds ({_list(seeds)}) ± their sample standard "
                     f"deviation, on the evaluation split ({summary.get('evaluation_split')}).")
    if COMBINED in metrics:
        others = " and ".join(m for m in metrics if m != COMBINED)
        lines.append(f"- {COMBINED}: the mean of {others}, as transformers' GLUE example (run_glue.py) reports it for "
                     "tasks with two metrics; fish-peft computes it in fish_peft/cli/tasks.py.")
    if tuned:
        t = summary["tuning"]
        lines.append(f"- lr: the learning rate the runs used, chosen per method from its grid by the score on a tuning "
                     f"split of {t['examples']:,} training examples held out (tuning_share {t['share']:g}, seed "
                     f"{t['seed']}); the evaluation split took no part. The grids' scores are in comparison.json.")
    else:
        lines.append("- lr: the learning rate the runs used (lr_by_method, else learning_rate); for classification "
                     "recipes, --lr-grid chooses each method's own on a tuning split held out of the training data.")
    lines += [
        "- batch: training batch size per device.",
        "- trainable: parameters training changes (a mask's entries, LoRA's matrices, or every weight for full), the "
        "task head included; % of model: the same as a share of the base model's parameters.",
        "- saved: size of the weight files saved in the run's folder (the adapter; the whole model for full).",
        "- step: mean wall time of one optimizer step.",
    ]
    if summary.get("device") == "cuda":
        lines.append("- peak memory: the most GPU memory torch allocated during the run.")
    else:
        lines.append("- peak memory: the process's peak resident memory during the run (from what it held when the run "
                     "began, the earlier runs' freed memory included).")
    return "\n".join(lines)


def files(summary: dict[str, Any]) -> str:
    """Where the comparison, each method's runs and the tuning runs went."""
    where = summary["files"]
    lines = ["Files:", f"- the comparison: {where['table']} (this text) and {where['json']} (every number above, each "
                       "run's metrics and the grids' scores)"]
    runs = ", ".join(where["runs"])
    if len(summary["seeds"]) > 1:
        methods = ", ".join(row["method"] for row in summary["rows"])
        runs = f"{where['folder']}/seed=<seed>/<method> (seeds {_list(summary['seeds'])}; methods {methods})"
    lines.append(f"- each method's runs (adapter, results.json, recipe.yaml, model card): {runs}")
    if where.get("masks_plot"):
        lines.append(f"- where each sparse method's budget went, on shared colour scales: {where['masks_plot']}")
    if where.get("tuning"):
        lines.append(f"- the tuning runs (the same files, scored on the tuning split): {where['tuning']}/<method>/lr=<lr>")
    return "\n".join(lines)


def _value(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if _known(std) else "")


def _known(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _bytes(size: Optional[float]) -> str:
    if size is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def _seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    return f"{1000 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _points(difference: float, metric: str) -> str:
    return f" ({100 * difference:.2f} points)" if metric in ("accuracy", "f1") else ""


def _list(values: list) -> str:
    return ", ".join(str(v) for v in values)
