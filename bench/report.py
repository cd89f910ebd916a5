"""One measured figure beside its baseline (``Row``), and the table that prints them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    scenario: str
    figure: str
    value: float
    unit: str
    baseline: float | None
    baseline_label: str
    ratio: float | None
    target: str
    met: bool | None


def reported(scenario: str, figure: str, value: float, unit: str) -> Row:
    """A figure reported alone: no baseline, no ratio, no target to meet."""
    return Row(scenario, figure, value, unit, None, "—", None, "report", None)


def print_table(rows: list[Row]) -> None:
    header = f"{'scenario':44} {'figure':34} {'value':>12} {'baseline':>12} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = f"{r.baseline:,.3f}" if r.baseline is not None else "—"
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "—"
        mark = "" if r.met is None else ("  ok" if r.met else "  MISSED")
        print(
            f"{r.scenario:44} {r.figure:34} {r.value:>12,.3f} {base:>12} {ratio:>7}  "
            f"{r.target}{mark}  [{r.unit}]"
        )
