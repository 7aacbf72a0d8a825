"""service.tables: both standard errors (ddof = 1 and the paper's std ddof = 0 / sqrt(n)), hand-computed.

n = 3, values 1, 2, 4: mean 7/3, sum of squared deviations 14/3;
    s.e. (ddof=1) = sqrt((14/3) / 2) / sqrt(3) = sqrt(7/9)   = 0.8819
    s.e. (paper)  = sqrt((14/3) / 3) / sqrt(3) = sqrt(14/27) = 0.7201
n = 5, values 1, 2, 3, 4, 10: mean 4, sum of squared deviations 50;
    s.e. (ddof=1) = sqrt(50 / 4) / sqrt(5) = sqrt(2.5) = 1.5811
    s.e. (paper)  = sqrt(50 / 5) / sqrt(5) = sqrt(2)   = 1.4142
"""

import math

import pandas as pd
import pytest

from jobs import report as report_job
from service.tables import (FINAL_METRICS, SE_LABEL, SE_PAPER_LABEL, aggregate, render_comparison,
                            standard_errors)

N3 = [1.0, 2.0, 4.0]
N5 = [1.0, 2.0, 3.0, 4.0, 10.0]
N3_SE, N3_SE_PAPER = math.sqrt(7 / 9), math.sqrt(14 / 27)
N5_SE, N5_SE_PAPER = math.sqrt(2.5), math.sqrt(2.0)


def _frame(runs):
    """runs: [(preset, [kl per seed])]; gnELBO = KL, JSD = 2 x KL."""
    base = {m: math.nan for m in FINAL_METRICS}
    rows = []
    for preset, values in runs:
        dataset, _, configuration = preset.partition("/")
        for seed, v in enumerate(values):
            rows.append({**base, "variant": len(rows), "preset": preset, "dataset": dataset,
                         "configuration": configuration, "seed": seed, "hparams": "{}", "status": "ok", "error": "",
                         "hist_kl": v, "gnelbo_x1e7": v, "hist_jsd": 2 * v})
    return pd.DataFrame(rows)


def test_standard_errors_by_hand_n3_n5_and_a_single_value():
    assert standard_errors(N3) == pytest.approx((N3_SE, N3_SE_PAPER))
    assert standard_errors(N5) == pytest.approx((N5_SE, N5_SE_PAPER))
    assert standard_errors(pd.Series(N5)) == pytest.approx((pd.Series(N5).std(ddof=1) / math.sqrt(5),
                                                            pd.Series(N5).std(ddof=0) / math.sqrt(5)))
    assert all(math.isnan(x) for x in standard_errors([3.0]))


def test_summary_holds_both_standard_errors():
    tables = aggregate(_frame([("8gaussians/sintro", N3), ("8gaussians/mog-ip-lc", N5), ("rings/sintro", [2.0])]))
    s = tables.summary.set_index(["dataset", "configuration", "metric"])
    assert list(tables.summary.columns) == ["dataset", "configuration", "metric", "mean", "se", "se_paper", "n",
                                            "paper_mean", "paper_se"]
    sg = s.loc[("8gaussians", "sintro", "hist_kl")]
    assert (sg["n"], sg["mean"]) == (3, pytest.approx(7 / 3))
    assert (sg["se"], sg["se_paper"]) == (pytest.approx(N3_SE), pytest.approx(N3_SE_PAPER))
    ip = s.loc[("8gaussians", "mog-ip-lc", "hist_jsd")]  # 2 x the values: 2 x both s.e.
    assert (ip["n"], ip["se"], ip["se_paper"]) == (5, pytest.approx(2 * N5_SE), pytest.approx(2 * N5_SE_PAPER))
    one = s.loc[("rings", "sintro", "hist_kl")]
    assert one["n"] == 1 and math.isnan(one["se"]) and math.isnan(one["se_paper"])


def test_table_md_labels_and_shows_both_standard_errors():
    md = aggregate(_frame([("8gaussians/sintro", N3), ("8gaussians/mog-ip-lc", N5)])).markdown
    # Table 1 cells: ddof = 1, the paper's in parentheses
    assert "| 8gaussians | KL | — (6.94 ± 0.36) | 2.33 ± 0.88 (1.23 ± 0.05) |" in md
    assert "4.00 ± 1.58 (2.24 ± 0.71) |" in md
    assert f"mean ± {SE_LABEL}" in md and SE_PAPER_LABEL in md
    assert "## Standard errors" in md
    header = next(line for line in md.splitlines() if SE_PAPER_LABEL in line and line.startswith("| dataset"))
    assert f"ours: mean ± {SE_LABEL} | {SE_PAPER_LABEL} | seeds |" in header
    assert "| 8gaussians | SG (sintro) | KL | 2.33 ± 0.88 | 0.72 | 3 | 1.23 ± 0.05 |" in md
    assert "| 8gaussians | IP LC (mog-ip-lc) | KL | 4.00 ± 1.58 | 1.41 | 5 | 2.24 ± 0.71 |" in md
    assert "| 8gaussians | IP LC (mog-ip-lc) | JSD | 8.00 ± 3.16 | 2.83 | 5 | 1.08 ± 0.07 |" in md


def test_official_sg_is_an_extra_column_without_paper_values():
    md = aggregate(_frame([("8gaussians/sintro", N3), ("8gaussians/sintro-official", N5)])).markdown
    assert "| dataset | metric | VAE | SG | fixed | IP | fixed LC | IP LC | SG official |" in md
    assert "| 8gaussians | KL | — (6.94 ± 0.36) | 2.33 ± 0.88 (1.23 ± 0.05) |" in md
    kl_row = next(line for line in md.splitlines() if line.startswith("| 8gaussians | KL |"))
    assert kl_row.endswith("| 4.00 ± 1.58 |")  # no paper value in parentheses
    assert "| 8gaussians | SG official (sintro-official) | KL | 4.00 ± 1.58 | 1.41 | 5 | — |" in md


def test_image_tables_carry_both_standard_errors_with_three_decimals():
    rows = [{"variant": i, "preset": "fmnist/mog10-ip-lc", "dataset": "fmnist", "configuration": "mog10-ip-lc",
             "seed": i, "hparams": "{}", "status": "ok", "error": "", "fid_fmnist_cnn": v, "hist_kl": math.nan}
            for i, v in enumerate(N3)]
    tables = aggregate(pd.DataFrame(rows), metric="fid_fmnist_cnn")
    assert "| fid_fmnist_cnn | 2.333 ± 0.882 |" in tables.markdown  # Table 2 layout, ddof = 1
    row = "| fmnist | mog10-ip-lc (mog10-ip-lc) | fid_fmnist_cnn | 2.333 ± 0.882 | 0.720 | 3 | — |"
    assert row in tables.markdown
    assert "| 8gaussians |" not in tables.markdown


def test_report_rerenders_both_standard_errors_from_results_parquet(tmp_path, capsys):
    _frame([("8gaussians/sintro", N5)]).to_parquet(tmp_path / "results.parquet", engine="pyarrow", index=False)
    assert report_job.main([str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    line = "| 8gaussians | SG (sintro) | KL | 4.00 ± 1.58 | 1.41 | 5 | 1.23 ± 0.05 |"
    assert line in table and SE_PAPER_LABEL in table
    out = capsys.readouterr().out
    assert line in out
    assert render_comparison(aggregate(_frame([("8gaussians/sintro", N5)])).summary).count(line) == 1


def test_calibrated_rows_show_ours_without_paper_values():
    frame = _frame([("8gaussians/sintro", N3)])
    frame["hist_kl_calibrated"] = [0.5, 0.7, 0.9]
    md = aggregate(frame).markdown
    assert "| 8gaussians | KL calibrated | — | 0.70 ± 0.12 | — | — | — | — |" in md
    assert "| 8gaussians | JSD calibrated | — | — | — | — | — | — |" in md  # not measured: no cell
    assert "| 8gaussians | SG (sintro) | KL calibrated | 0.70 ± 0.12 |" in md
