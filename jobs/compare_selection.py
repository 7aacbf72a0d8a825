"""Does a staged / early-stopped sweep pick the same hyperparameters as the exhaustive grid, and at what cost?

    python -m jobs.compare_selection runs/agreement_grid runs/agreement_staged

Both arguments are sweep ``--output-dir``s over the same settings (``tune_spaces/agreement_*.yaml``).
Per preset it prints the exhaustive pick (the best setting of the full grid by the sweep's
selection: mean ``metric`` over completed seeds, ``where`` constraint), the staged pick (the best
setting of the staged sweep's last stage), whether they agree on the searched keys (the betas),
the rank of the staged pick in the exhaustive ranking, and the cost of each sweep: iterations
trained (a trial stopped early counts up to its last evaluation; a reused trial counts 0) and
wall time (``progress.json``). Exit status 0, or 2 for a folder without results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from service.selection import Selection, pick_candidates, rank_settings
from service.sweep_report import PROGRESS_FILE, searched_params


def _selection(state: dict[str, Any]) -> Selection:
    raw = state.get("select") or {"metric": state.get("metric", "hist_kl"), "mode": state.get("mode", "min")}
    where = tuple((name, b.get("min"), b.get("max")) for name, b in (raw.get("where") or {}).items())
    return Selection(raw["metric"], raw["mode"], where)


def load(out: str | Path) -> dict[str, Any]:
    """A sweep folder: its frame, state, selection, searched keys and cost."""
    import pandas as pd

    out = Path(out)
    parquet = out / "results.parquet"
    if not parquet.is_file():
        raise FileNotFoundError(f"{out}: no results.parquet; give a sweep's --output-dir")
    df = pd.read_parquet(parquet)
    state = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    progress = json.loads((out / PROGRESS_FILE).read_text()) if (out / PROGRESS_FILE).is_file() else {}
    if "trained_iterations" in df:
        iterations = float(df["trained_iterations"].fillna(0).sum())
    else:  # sweeps from before the staged protocol: finished trials only
        iterations = float(df.loc[df["status"] == "ok", "iteration"].fillna(0).sum())
    wall = sum(s.get("wall_s", 0.0) for s in progress.get("stages", {}).values()) if progress else math.nan
    if "params" not in df:
        df["params"] = df["hparams"]
    if "stage" not in df:
        df["stage"] = 1
    searched = state.get("searched") or sorted({k for p in df["params"] for k in json.loads(p)})
    return {"out": out, "df": df, "select": _selection(state), "searched": list(searched), "iterations": iterations,
            "wall_s": wall, "trial_s": float(df["time_s"].fillna(0).sum()) if "time_s" in df else math.nan}


def _key(params: str, searched: list[str]) -> str:
    return json.dumps({k: round(v, 12) if isinstance(v, float) else v
                       for k, v in searched_params(params, searched).items()}, sort_keys=True)


def compare(exhaustive_dir: str | Path, staged_dir: str | Path) -> dict[str, Any]:
    """Per preset ``{exhaustive, staged, same, rank, settings}`` plus both sweeps' costs and the ratios."""
    exh, stg = load(exhaustive_dir), load(staged_dir)
    select, searched = exh["select"], exh["searched"]
    ranked = rank_settings(exh["df"], select)
    if select.where:  # the exhaustive ranking as the constrained selection sees it
        keep = ranked.groupby("preset")["satisfies"].transform("any")
        ranked = ranked[ranked["satisfies"] | ~keep]
    last = stg["df"][stg["df"]["stage"] == stg["df"]["stage"].max()]
    staged_picks, notes = pick_candidates(last, stg["select"], 1)
    by_preset = {p["preset"]: p for p in staged_picks}
    presets = []
    for preset, mine in ranked.groupby("preset", sort=False):
        order = [_key(p, searched) for p in mine["params"]]
        pick = by_preset.get(preset)
        key = _key(pick["params"], searched) if pick else None
        presets.append({"preset": preset, "exhaustive": searched_params(mine["params"].iloc[0], searched),
                        "exhaustive_score": float(mine["score"].iloc[0]),
                        "staged": searched_params(pick["params"], searched) if pick else None,
                        "staged_score": pick["score"] if pick else math.nan,
                        "same": key == order[0], "rank": order.index(key) + 1 if key in order else None,
                        "settings": len(order)})
    ratio = lambda a, b: b / a if a and not math.isnan(a) and not math.isnan(b) else math.nan  # noqa: E731
    return {"metric": select.metric, "presets": presets, "notes": notes,
            "exhaustive": {k: exh[k] for k in ("iterations", "wall_s", "trial_s")},
            "staged": {k: stg[k] for k in ("iterations", "wall_s", "trial_s")},
            "iterations_ratio": ratio(exh["iterations"], stg["iterations"]),
            "wall_ratio": ratio(exh["wall_s"], stg["wall_s"]), "trial_time_ratio": ratio(exh["trial_s"], stg["trial_s"])}


def render(result: dict[str, Any]) -> str:
    m = result["metric"]
    lines = [f"| preset | exhaustive pick ({m}) | staged pick ({m}) | same betas | staged pick's rank in the grid |",
             "| --- | --- | --- | --- | --- |"]
    for p in result["presets"]:
        rank = f"{p['rank']} of {p['settings']}" if p["rank"] else "not among the grid's completed settings"
        lines.append(f"| {p['preset']} | `{json.dumps(p['exhaustive'])}` ({p['exhaustive_score']:.4g}) | "
                     f"`{json.dumps(p['staged'])}` ({p['staged_score']:.4g}) | {'yes' if p['same'] else 'no'} | "
                     f"{rank} |")
    same = sum(p["same"] for p in result["presets"])
    e, s = result["exhaustive"], result["staged"]
    lines += ["", f"Agreement: {same} of {len(result['presets'])} presets.",
              f"Cost, staged / exhaustive: iterations trained {s['iterations']:,.0f} / {e['iterations']:,.0f} "
              f"= {result['iterations_ratio']:.2f}; wall {s['wall_s'] / 60:.1f} / {e['wall_s'] / 60:.1f} min "
              f"= {result['wall_ratio']:.2f}; trial time {s['trial_s'] / 60:.1f} / {e['trial_s'] / 60:.1f} min "
              f"= {result['trial_time_ratio']:.2f}."]
    lines += [f"Note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exhaustive", help="the --output-dir of the exhaustive sweep (every setting, no early stopping)")
    p.add_argument("staged", help="the --output-dir of the staged / early-stopped sweep over the same settings")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = p.parse_args(argv)
    try:
        result = compare(args.exhaustive, args.staged)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str) if args.json else render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
