"""Re-render a sweep's tables from its results.parquet (selection + mean ± s.e., paper Table 1 layout).

    python -m jobs.report runs/smoke_seeds                # a sweep's --output-dir
    python -m jobs.report runs/smoke_seeds/results.parquet --metric hist_jsd

Selection (SPEC §6.4): per (dataset, configuration) the hyperparameters whose completed seeds have
the lowest mean ``--metric`` (default: the sweep's, else ``hist_kl``), among the settings that meet
the sweep's ``select.where`` constraint if it has one (else all); then mean ± standard error
(std(ddof=1)/sqrt(n), and the paper's std(ddof=0)/sqrt(n) beside it) over seeds of gnELBO x 1e7, KL and JSD next to the paper's values (SPEC §8). For a
staged sweep the tables are those of its last stage (``--stage N`` for another).
Writes ``table.md`` next to the Parquet file (unless ``--no-write``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.selection import Selection, constrained_frame
from service.spaces import OPTIONAL_METRICS
from service.tables import FINAL_METRICS, aggregate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a sweep's output dir or its results.parquet")
    p.add_argument("--metric", choices=tuple(dict.fromkeys(FINAL_METRICS + OPTIONAL_METRICS)),
                   help="selection metric (default: the sweep's, else hist_kl)")
    p.add_argument("--mode", choices=("min", "max"), help="selection direction (default: the sweep's, else min)")
    p.add_argument("--stage", type=int, help="a staged sweep's stage to tabulate (default: its last)")
    p.add_argument("--no-write", action="store_true", help="print only; leave table.md as it is")
    args = p.parse_args(argv)
    path = Path(args.results)
    parquet = path / "results.parquet" if path.is_dir() else path
    if not parquet.is_file():
        print(f"error: results: {parquet} does not exist; give a sweep's --output-dir or its results.parquet",
              file=sys.stderr)
        return 2
    import pandas as pd

    state_file = parquet.parent / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    metric = args.metric or state.get("metric", "hist_kl")
    mode = args.mode or state.get("mode", "min")
    df = pd.read_parquet(parquet)
    if "stage" not in df:  # sweeps from before stages
        df["stage"], df["stage_name"] = 1, "sweep"
    stages = sorted(int(s) for s in df["stage"].unique())
    stage = args.stage or stages[-1]
    if stage not in stages:
        print(f"error: --stage: {stage} is not one of {stages}", file=sys.stderr)
        return 2
    if len(stages) > 1:
        df = df[df["stage"] == stage]
        print(f"Stage {stage} ({df['stage_name'].iloc[0]}) of {len(stages)}\n")
    where = (state.get("select") or {}).get("where") or {}
    select = Selection(metric, mode, tuple((k, b.get("min"), b.get("max")) for k, b in where.items()))
    tables = aggregate(constrained_frame(df, select), metric=metric, mode=mode)
    if not args.no_write and stage == stages[-1]:
        (parquet.parent / "table.md").write_text(tables.markdown)
    print(tables.markdown)  # it holds the comparison with the paper (both standard errors)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
