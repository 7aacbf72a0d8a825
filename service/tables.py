"""Sweep results -> the paper's tables: selection per (dataset, configuration), mean ± s.e. over seeds.

SPEC §6.4: per dataset and prior configuration the hyperparameters with the lowest mean
histogram KL are selected; their seeds are reported as mean ± standard error of gnELBO x 1e7, KL
and JSD in the layout of the paper's Table 1, next to the paper's values (SPEC §8). Input: the
results frame of ``service.tuning`` (one row per trial; ``results.parquet``). Plain pandas, no
Ray or MLflow.

Two standard errors, both in the summary and in ``table.md`` (``standard_errors``):

- ``se``, "s.e. (ddof=1)": ``std(ddof=1) / sqrt(n)``, the unbiased-variance convention; the
  cells of the Table 1 / Table 2 layouts use it.
- ``se_paper``, "s.e. (paper: std ddof=0 / sqrt(n))": the population standard deviation
  (``numpy.std``'s default ddof = 0) over ``sqrt(n)``, the paper's convention for its Table 1; smaller by
  ``sqrt((n - 1) / n)`` (x 0.816 for 3 seeds, x 0.894 for 5). Compare this one with the paper's
  s.e. in parentheses.

Both are NaN (not shown) for a single seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .tracking import METRIC_NAMES

if TYPE_CHECKING:
    import pandas as pd

FINAL_METRICS = tuple(m.removeprefix("eval/") for m in METRIC_NAMES if m.startswith("eval/"))  # 2D
# Final metrics of image runs (service/image_eval.py; SPEC §7.4): feature-based names carry the
# extractor's tag: "" (clean-fid Inception), "_paper" (the paper's protocol), "_<dataset>_cnn" (offline).
_TAGS = ("", "_paper", "_mnist_cnn", "_fmnist_cnn", "_cifar10_cnn")
IMAGE_METRICS = (*(f"{base}{tag}" for base in ("fid", "fid_rec", "precision", "recall") for tag in _TAGS),
                 "svm_2k_acc", "svm_10k_acc", "knn_5_acc", "knn_100_acc", "rec_error_test",
                 "prior_entropy_norm", "prior_active_components")
KNOWN_METRICS = tuple(dict.fromkeys(FINAL_METRICS + IMAGE_METRICS))

TABLE_COLUMNS = {"vae": "VAE", "sintro": "SG", "mog-fixed": "fixed", "mog-ip": "IP", "mog-fixed-lc": "fixed LC",
                 "mog-ip-lc": "IP LC"}  # SPEC §8 column order
# 2D configurations that are no column of the paper's Table 1 (service/presets.py): extra columns
# after the six, without paper values; any other configuration is labelled by its name.
EXTRA_COLUMNS = {"sintro-official": "SG official"}
SE_LABEL = "s.e. (ddof=1)"
SE_PAPER_LABEL = "s.e. (paper: std ddof=0 / sqrt(n))"
# Table 1's rows; the calibrated decoder's KL / JSD (service.evaluation.calibrated_metrics) are ours only
TABLE_METRICS = {"gnelbo_x1e7": "gnELBO", "hist_kl": "KL", "hist_jsd": "JSD",
                 "hist_kl_calibrated": "KL calibrated", "hist_jsd_calibrated": "JSD calibrated"}
# Paper Table 1 (mean, s.e. over 5 seeds), columns as TABLE_COLUMNS. Means: SPEC §8; s.e.: the paper's table
# (its convention: std ddof=0 / sqrt(n), our ``se_paper``).
PAPER_TABLE1 = {
    ("8gaussians", "gnelbo_x1e7"): [(7.48, .03), (.51, .07), (3.62, .31), (4.8, .15), (.25, .02), (.26, .04)],
    ("8gaussians", "hist_kl"): [(6.94, .36), (1.23, .05), (4.46, 2.63), (2.36, .3), (1.94, .33), (2.24, .71)],
    ("8gaussians", "hist_jsd"): [(17.41, .12), (1.01, .08), (1.77, .7), (1.79, .09), (1.13, .12), (1.08, .07)],
    ("2spirals", "gnelbo_x1e7"): [(6.23, .01), (6.41, .27), (6.41, .43), (6.04, .36), (5.81, .4), (6.47, .28)],
    ("2spirals", "hist_kl"): [(10.18, .16), (9.5, .55), (8.61, .35), (8.31, .2), (9.45, .56), (8.02, .11)],
    ("2spirals", "hist_jsd"): [(4.94, .11), (4.21, .22), (3.76, .04), (3.53, .04), (3.89, .08), (3.64, .07)],
    ("checkerboard", "gnelbo_x1e7"): [(8.62, .05), (7.21, .05), (8, .03), (7.66, .13), (7.81, .09), (7.67, .06)],
    ("checkerboard", "hist_kl"): [(20.79, .08), (19.62, .25), (18.58, .22), (18.72, .27), (19.04, .65), (17.7, .11)],
    ("checkerboard", "hist_jsd"): [(9.97, .06), (8.87, .07), (8.65, .04), (8.71, .08), (8.9, .22), (8.46, .07)],
    ("rings", "gnelbo_x1e7"): [(6.37, .04), (6.03, .05), (6.73, .18), (6.86, .16), (6.4, .34), (6.65, .18)],
    ("rings", "hist_kl"): [(13.3, .28), (9.99, .27), (10.07, .37), (9.77, .31), (11.31, .56), (10.31, 1.03)],
    ("rings", "hist_jsd"): [(7.4, .08), (4.05, .07), (4.13, .08), (4.12, .07), (5.19, .33), (4.33, .33)],
}


@dataclass
class Tables:
    selected: "pd.DataFrame"  # per (dataset, configuration): hparams, score, seeds, failed
    summary: "pd.DataFrame"  # per (dataset, configuration, metric): mean, se, se_paper, n, paper_mean, paper_se
    markdown: str


def select_best(df: "pd.DataFrame", metric: str = "hist_kl", mode: str = "min") -> "pd.DataFrame":
    """Per (dataset, configuration), the hparams whose completed seeds have the best mean ``metric``."""
    import pandas as pd

    if metric not in df.columns:  # no trial reported it
        return pd.DataFrame(columns=["dataset", "configuration", "hparams", "score", "seeds", "failed"])
    ok = df[(df["status"] == "ok") & df[metric].notna()]
    cols = ["dataset", "configuration", "hparams"]
    groups = ok.groupby(cols, sort=False).agg(score=(metric, "mean"), seeds=(metric, "size"),
                                              first=("variant", "min")).reset_index()
    failed = df[df["status"] != "ok"].groupby(["dataset", "configuration"]).size().rename("failed")
    groups = groups.sort_values(["score", "first"], ascending=[mode == "min", True], kind="stable")
    best = groups.drop_duplicates(["dataset", "configuration"]).drop(columns="first")
    best = best.merge(failed.reset_index(), on=["dataset", "configuration"], how="left")
    best["failed"] = best["failed"].fillna(0).astype(int)
    return best.sort_values(["dataset", "configuration"]).reset_index(drop=True) if len(best) else pd.DataFrame(
        columns=["dataset", "configuration", "hparams", "score", "seeds", "failed"])


def standard_errors(values) -> tuple[float, float]:
    """(``std(ddof=1) / sqrt(n)``, ``std(ddof=0) / sqrt(n)``) of ``values``; both NaN for fewer than 2 values.

    The first is the tables' s.e. (ddof=1); the second the paper's convention. E.g. 1, 2, 4:
    sqrt(7/3) / sqrt(3) = 0.882 and sqrt(14/9) / sqrt(3) = 0.720.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n < 2:
        return math.nan, math.nan
    mean = sum(xs) / n
    ss = sum((x - mean) ** 2 for x in xs)
    return math.sqrt(ss / (n - 1)) / math.sqrt(n), math.sqrt(ss / n) / math.sqrt(n)


def summarize(df: "pd.DataFrame", selected: "pd.DataFrame") -> "pd.DataFrame":
    """Mean and both standard errors (``se``: std(ddof=1)/sqrt(n); ``se_paper``: std(ddof=0)/sqrt(n);
    NaN for n = 1) of every metric of the selected trials, with the paper's Table 1 value where it has one."""
    import pandas as pd

    metrics = [m for m in KNOWN_METRICS if m in df.columns]
    rows = []
    for sel in selected.itertuples():
        runs = df[(df["dataset"] == sel.dataset) & (df["configuration"] == sel.configuration)
                  & (df["hparams"] == sel.hparams) & (df["status"] == "ok")]
        for metric in metrics:
            values = runs[metric].dropna()
            n = len(values)
            if n == 0:
                continue
            se, se_paper = standard_errors(values)
            paper = PAPER_TABLE1.get((sel.dataset, metric))
            col = list(TABLE_COLUMNS).index(sel.configuration) if sel.configuration in TABLE_COLUMNS else None
            p_mean, p_se = paper[col] if paper and col is not None else (math.nan, math.nan)
            rows.append({"dataset": sel.dataset, "configuration": sel.configuration, "metric": metric,
                         "mean": float(values.mean()), "se": se, "se_paper": se_paper, "n": n,
                         "paper_mean": p_mean, "paper_se": p_se})
    return pd.DataFrame(rows, columns=["dataset", "configuration", "metric", "mean", "se", "se_paper", "n",
                                       "paper_mean", "paper_se"])


def _cell(mean: float, se: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _label(configuration: str) -> str:
    return TABLE_COLUMNS.get(configuration) or EXTRA_COLUMNS.get(configuration, configuration)


def _extra_configurations(summary: "pd.DataFrame", datasets: list[str]) -> list[str]:
    """Configurations of ``datasets`` in the summary that are no paper column: known variants first."""
    found = set(summary.loc[summary["dataset"].isin(datasets), "configuration"]) - set(TABLE_COLUMNS)
    return [c for c in EXTRA_COLUMNS if c in found] + sorted(found - set(EXTRA_COLUMNS))


def _table1(summary: "pd.DataFrame", datasets: list[str]) -> list[str]:
    """Paper Table 1 layout: rows dataset x metric, columns the six configurations (paper in parentheses),
    then any other configuration run (e.g. ``sintro-official``), which has no paper value."""
    extra = _extra_configurations(summary, datasets)
    columns = list(TABLE_COLUMNS) + extra
    lines = ["| dataset | metric | " + " | ".join(_label(c) for c in columns) + " |",
             "| --- | --- |" + " --- |" * len(columns)]
    by_key = {(r.dataset, r.configuration, r.metric): r for r in summary.itertuples()}
    for dataset in datasets:
        for m, label in TABLE_METRICS.items():
            paper = PAPER_TABLE1.get((dataset, m))
            cells = []
            for i, conf in enumerate(columns):
                r = by_key.get((dataset, conf, m))
                ours = _cell(r.mean, r.se) if r is not None else "—"
                cells.append(f"{ours} ({_cell(*paper[i])})" if paper and i < len(TABLE_COLUMNS) else ours)
            lines.append(f"| {dataset} | {label} | " + " | ".join(cells) + " |")
    return lines


def _table2(summary: "pd.DataFrame", dataset: str) -> list[str]:
    """Paper Table 2/5 layout for one image dataset: rows metrics, columns the configurations run."""
    rows = summary[summary["dataset"] == dataset]
    configs = list(dict.fromkeys(rows["configuration"]))
    lines = [f"### {dataset}", "", "| metric | " + " | ".join(configs) + " |", "| --- |" + " --- |" * len(configs)]
    by_key = {(r.configuration, r.metric): r for r in rows.itertuples()}
    for m in [m for m in KNOWN_METRICS if m in set(rows["metric"])]:
        cells = [_cell(by_key[(c, m)].mean, by_key[(c, m)].se, 3) if (c, m) in by_key else "—" for c in configs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(df: "pd.DataFrame", selected: "pd.DataFrame", summary: "pd.DataFrame", metric: str,
                    mode: str = "min") -> str:
    """Table 1 layout for 2D datasets (ours, the paper's in parentheses), Table 2 layout for images,
    then the selected hyperparameters and the failed trials."""
    counts = df["status"].value_counts()
    lines = ["# Sweep results", "",
             f"{len(df)} trial{'s' if len(df) != 1 else ''}: {counts.get('ok', 0)} completed, {counts.get('failed', 0)} failed"
             + (f", {counts['incomplete']} incomplete" if counts.get("incomplete", 0) else "") + ". "
             f"Selection: per (dataset, configuration) the hyperparameters with the "
             f"{'lowest' if mode == 'min' else 'highest'} mean `{metric}` over their completed seeds; cells are "
             f"mean ± {SE_LABEL} over those seeds (std(ddof=1)/sqrt(n), none for n = 1). The paper's convention, "
             f"{SE_PAPER_LABEL}, is beside it under \"Standard errors\" below.", ""]
    if metric not in df.columns or df[metric].isna().all():
        lines += [f"No completed trial reported `{metric}`: nothing to select.", ""]
    datasets = sorted(df["dataset"].unique())
    toy = [d for d in datasets if any(k[0] == d for k in PAPER_TABLE1)]
    if toy:
        lines += ["Paper (Table 1, SPEC §8) in parentheses. Lower is better; gnELBO x 1e7. \"calibrated\": the "
                  "histograms of samples D(z) + sigma * eps of the calibrated Gaussian decoder (sigma its maximum-"
                  "likelihood value; not in the paper, which scores the decoder means D(z)).", ""]
        lines += _table1(summary, toy) + [""]
        lines += [f"Our cells: mean ± {SE_LABEL}. The paper's ± is its {SE_PAPER_LABEL}, smaller than "
                  "ddof = 1 by sqrt((n - 1)/n) (x 0.816 for 3 seeds, x 0.894 for 5); for a like-for-like "
                  "comparison read our s.e. in the paper's convention under \"Standard errors\".", ""]
    for dataset in (d for d in datasets if d not in toy):
        lines += _table2(summary, dataset)
    if len(summary):
        lines += ["## Standard errors", "",
                  f"Each selected cell with both standard errors: {SE_LABEL} = std(ddof=1)/sqrt(n), as in the "
                  f"tables above; {SE_PAPER_LABEL} = std(ddof=0)/sqrt(n), the paper's convention. "
                  "Paper: its Table 1 (5 seeds), mean ± its s.e.", ""]
        lines += render_comparison(summary).splitlines() + [""]
    lines += ["## Selected hyperparameters", "",
              f"| dataset | configuration | hyperparameters | mean {metric} | seeds | failed trials |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in selected.itertuples():
        lines.append(f"| {s.dataset} | {s.configuration} | `{s.hparams}` | {s.score:.3f} | {s.seeds} | {s.failed} |")
    failed = df[df["status"] != "ok"]
    if len(failed):
        lines += ["", "## Failed or incomplete trials", "", "| variant | preset | hyperparameters | seed | error |",
                  "| --- | --- | --- | --- | --- |"]
        for f in failed.head(50).itertuples():
            error = str(f.error).replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {f.variant} | {f.preset} | `{f.hparams}` | {f.seed} | {error} |")
    return "\n".join(lines) + "\n"


def render_comparison(summary: "pd.DataFrame") -> str:
    """One row per (dataset, configuration, metric): ours as mean ± s.e. (ddof=1), our s.e. in the paper's
    convention (std ddof=0 / sqrt(n)), the number of seeds, and the paper's Table 1 value (mean ± its s.e.).

    2D datasets: gnELBO x 1e7, KL and JSD (2 decimals); image datasets: every metric (3 decimals).
    """
    lines = [f"| dataset | configuration | metric | ours: mean ± {SE_LABEL} | {SE_PAPER_LABEL} | seeds | "
             "paper (Table 1, 5 seeds): mean ± s.e. |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    order = {c: i for i, c in enumerate([*TABLE_COLUMNS, *EXTRA_COLUMNS])}
    metrics = list(dict.fromkeys([*TABLE_METRICS, *KNOWN_METRICS]))
    toy = {d for d, _ in PAPER_TABLE1}
    keep = summary["metric"].isin(TABLE_METRICS) | ~summary["dataset"].isin(toy)
    rows = summary[keep & summary["metric"].isin(metrics)].copy()
    rows["_c"] = rows["configuration"].map(lambda c: order.get(c, len(order)))
    rows["_m"] = rows["metric"].map(metrics.index)
    for r in rows.sort_values(["dataset", "_c", "configuration", "_m"]).itertuples():
        digits = 2 if r.dataset in toy else 3
        label = f"{_label(r.configuration)} ({r.configuration})"
        se_paper = "—" if math.isnan(r.se_paper) else f"{r.se_paper:.{digits}f}"
        lines.append(f"| {r.dataset} | {label} | {TABLE_METRICS.get(r.metric, r.metric)} | "
                     f"{_cell(r.mean, r.se, digits)} | {se_paper} | {r.n} | {_cell(r.paper_mean, r.paper_se)} |")
    return "\n".join(lines) + "\n"


def aggregate(df: "pd.DataFrame", metric: str = "hist_kl", mode: str = "min") -> Tables:
    """Select (SPEC §6.4) and summarise a results frame; returns the tables and their Markdown."""
    selected = select_best(df, metric, mode)
    summary = summarize(df, selected)
    return Tables(selected, summary, render_markdown(df, selected, summary, metric, mode))


def write_results(df: "pd.DataFrame", tables: Tables, out: str | Path) -> None:
    """``out/results.parquet`` (every trial) and ``out/table.md``."""
    out = Path(out)
    df.to_parquet(out / "results.parquet", engine="pyarrow", index=False)
    (out / "table.md").write_text(tables.markdown)
