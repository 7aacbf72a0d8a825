"""How sweep settings are ranked and picked (SPEC §6.4): the selection rule of a space file
(``select: {metric, mode, where}``) and the ranking of a results frame's settings between the stages
of a staged protocol, for its tables and reports. Plain pandas; no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

SCORE_KEY = "selection_score"  # the scheduler's metric when the selection is constrained (Selection.score)
INFEASIBLE = 1e9  # added to (mode min) or taken from (max) the metric of a report that violates ``where``


@dataclass(frozen=True)
class Selection:
    """How settings are ranked: mean ``metric`` over completed seeds, ``mode``; ``where`` bounds
    ``(metric, lo, hi)`` on other means (inclusive; None = unbounded)."""

    metric: str = "hist_kl"
    mode: str = "min"
    where: tuple[tuple[str, float | None, float | None], ...] = ()

    def describe_where(self) -> str:
        parts = []
        for name, lo, hi in self.where:
            parts += [f"{name} >= {lo:g}"] if lo is not None else []
            parts += [f"{name} <= {hi:g}"] if hi is not None else []
        return " and ".join(parts)

    @property
    def scheduler_metric(self) -> str:
        """What an early-stopping scheduler ranks: the metric itself, or ``SCORE_KEY`` under ``where``."""
        return SCORE_KEY if self.where else self.metric

    def score(self, values: dict[str, Any]) -> float:
        """One report's rank for early stopping: the metric where every ``where`` bound holds, else the
        metric pushed behind every feasible value (``INFEASIBLE``, in the direction of ``mode``).

        This is the final selection's order (feasible settings first, by the metric; all settings by
        the metric when none is feasible), so a scheduler does not stop the trials the selection wants:
        unconstrained, ASHA would rank a sharp setting (pure modes, higher KL) behind a blurry one."""
        value = float(values.get(self.metric, math.nan))
        if math.isnan(value) or self.holds(values):
            return value
        return value + INFEASIBLE if self.mode == "min" else value - INFEASIBLE

    def holds(self, values: dict[str, Any]) -> bool:
        """Every ``where`` bound holds on ``values`` (a missing or NaN value does not)."""
        for name, lo, hi in self.where:
            x = float(values.get(name, math.nan))
            if math.isnan(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        where = {name: {k: v for k, v in (("min", lo), ("max", hi)) if v is not None} for name, lo, hi in self.where}
        return {"metric": self.metric, "mode": self.mode, **({"where": where} if where else {})}


def rank_settings(df: "pd.DataFrame", select: Selection) -> "pd.DataFrame":
    """Per preset, every hyperparameter setting with a completed trial, best first.

    A setting is a ``(preset, hparams)`` group; its ``score`` is the mean ``select.metric`` over its
    completed (``status == "ok"``) seeds, and ``satisfies`` says whether the means of the ``where``
    metrics are within their bounds (a missing metric does not satisfy). Columns: ``preset``,
    ``hparams``, ``params``, ``score``, ``seeds`` (sorted list), ``n``, ``satisfies``, ``rank``
    (1-based, unconstrained, per preset), ``first`` (lowest variant id), and the ``where`` means.
    """
    import pandas as pd

    cols = ["preset", "hparams", "params", "score", "seeds", "n", "satisfies", "rank", "first"]
    if select.metric not in df.columns or not len(df):
        return pd.DataFrame(columns=cols)
    ok = df[(df["status"] == "ok") & df[select.metric].notna()]
    rows = []
    for (preset, hparams), g in ok.groupby(["preset", "hparams"], sort=False):
        row = {"preset": preset, "hparams": hparams,
               "params": g["params"].iloc[0] if "params" in g else hparams,
               "score": float(g[select.metric].mean()), "seeds": sorted(int(s) for s in g["seed"].unique()),
               "n": len(g), "first": int(g["variant"].min())}
        for name, _, _ in select.where:
            row[name] = float(g[name].mean()) if name in g and g[name].notna().any() else math.nan
        row["satisfies"] = select.holds(row)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows)
    out = out.sort_values(["preset", "score", "first"], ascending=[True, select.mode == "min", True], kind="stable")
    out["rank"] = out.groupby("preset").cumcount() + 1
    return out.reset_index(drop=True)


def pick_candidates(df: "pd.DataFrame", select: Selection, top_k: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``top_k`` settings per preset (``rank_settings``) that satisfy ``select.where``; where none of
    a preset's settings does, its unconstrained top ``top_k`` with a note saying so.

    Returns ``(picks, notes)``; a pick is ``{preset, hparams, params, score, seeds, rank, constrained}``.
    """
    ranked = rank_settings(df, select)
    picks, notes = [], []
    for preset in dict.fromkeys(df["preset"]) if len(df) else []:
        mine = ranked[ranked["preset"] == preset]
        if not len(mine):
            notes.append(f"{preset}: no completed trial reported {select.metric}; nothing to select")
            continue
        chosen, constrained = mine, False
        if select.where:
            ok = mine[mine["satisfies"]]
            if len(ok):
                chosen, constrained = ok, True
            else:
                best = ", ".join(f"best {name} {mine[name].max() if lo is not None else mine[name].min():.4g}"
                                 for name, lo, _ in select.where if name in mine and mine[name].notna().any())
                notes.append(f"{preset}: no setting satisfies {select.describe_where()} "
                             f"({best or 'not reported'}); falling back to the unconstrained pick by {select.metric}")
        for r in chosen.head(top_k).itertuples():
            picks.append({"preset": r.preset, "hparams": r.hparams, "params": r.params, "score": r.score,
                          "seeds": list(r.seeds), "rank": int(r.rank), "constrained": constrained})
    return picks, notes


def constrained_frame(df: "pd.DataFrame", select: Selection) -> "pd.DataFrame":
    """``df`` without the completed trials of settings that violate ``select.where``, per preset where
    at least one setting satisfies it (elsewhere nothing is removed: the unconstrained fallback)."""
    if not select.where or not len(df):
        return df
    ranked = rank_settings(df, select)
    drop = set()
    for preset, mine in ranked.groupby("preset"):
        if mine["satisfies"].any():
            drop |= {(preset, h) for h in mine.loc[~mine["satisfies"], "hparams"]}
    keep = [not (s == "ok" and (p, h) in drop) for s, p, h in zip(df["status"], df["preset"], df["hparams"])]
    return df[keep]
