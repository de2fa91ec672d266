"""The benchmark scripts' report logic: tables and target checks on hand-made results (no training)."""

from __future__ import annotations

import pytest

from bench.adaptation import average, checks, table
from bench.uda import table as uda_table


def _row(style: str, source: float, oracle: float, **methods: float) -> dict:
    row = {"style": style, "source": {"miou": source}, "oracle": {"miou": oracle}}
    for name, miou in methods.items():
        row[name] = {"miou": miou, "raw_miou": miou, "passed": True}
    return row


def test_adaptation_checks_recovered_share_and_floor() -> None:
    rows = [_row("fog", 20.0, 80.0, bn=40.0, stpl=56.0), _row("night", 10.0, 50.0, bn=20.0, stpl=30.0)]
    recovered, gain = "stpl recovers % of the oracle's gain on average", "stpl minus bn mIoU on average"
    worst_bn, worst_stpl = "bn minus source-only mIoU, worst style", "stpl minus source-only mIoU, worst style"
    result = checks(rows, ["oracle", "bn", "stpl"])
    assert set(result) == {recovered, gain, worst_bn, worst_stpl}
    # shares 0.6 and 0.5 -> 55 %; stpl - bn = +16 and +10 -> +13; bn gains +20 and +10, stpl +36 and +20
    assert result[recovered] == {"value": 55.0, "target": 50.0, "passed": True}
    assert result[gain] == {"value": 13.0, "target": 3.0, "passed": True}
    assert result[worst_bn] == {"value": 10.0, "target": 0.0, "passed": True}
    assert result[worst_stpl] == {"value": 20.0, "target": 0.0, "passed": True}
    rows[1]["bn"]["miou"] = 9.5
    assert checks(rows, ["oracle", "bn", "stpl"])[worst_bn] == {"value": -0.5, "target": 0.0, "passed": False}
    rows[0]["stpl"]["miou"] = 30.0  # share 1/6 and 1/2 -> 33 %
    assert checks(rows, ["oracle", "bn", "stpl"])[recovered]["value"] == pytest.approx(100 / 3, abs=0.01)
    assert checks(rows, ["oracle", "bn", "stpl"])[recovered]["passed"] is False
    assert set(checks(rows, ["bn"])) == {worst_bn}  # a check needs the methods it compares


def test_adaptation_table_marks_rejected_candidates() -> None:
    rows = [_row("fog", 20.0, 80.0, bn=40.0, stpl=20.0)]
    rows[0]["stpl"].update(passed=False, raw_miou=12.5)
    text = table(rows, ["oracle", "bn", "stpl"])
    assert "| fog | 20.0 | 80.0 | 40.0 | 20.0 (rejected; 12.5) |" in text
    assert "| **recovered** | – | – | 33% | 0% |" in text


def test_adaptation_seeds_average_into_one_cell() -> None:
    runs = [{"seed": 0, "miou": 30.0, "raw_miou": 30.0, "tc": 90.0, "steps": 100, "passed": True},
            {"seed": 1, "miou": 20.0, "raw_miou": 15.0, "tc": 80.0, "steps": 110, "passed": False}]
    cell = average(runs)
    assert cell["miou"] == 25.0 and cell["raw_miou"] == 22.5 and cell["steps"] == 105.0
    assert cell["passed"] is False and cell["rejected_seeds"] == [1] and cell["per_seed"] == runs
    assert average([{"seed": 0, "miou": 80.0, "tc": 95.0, "steps": 120}]) == {
        "miou": 80.0, "tc": 95.0, "steps": 120.0, "per_seed": [{"seed": 0, "miou": 80.0, "tc": 95.0, "steps": 120}]}
    row = {"style": "fog", "source": {"miou": 20.0}, "oracle": {"miou": 80.0}, "stpl": cell}
    assert "| fog | 20.0 | 80.0 | 25.0 (rejected 1/2; 22.5) |" in table([row], ["oracle", "stpl"])


def test_uda_table_has_init_row_mean_and_steps() -> None:
    results = {"fog": {"init": {"miou": 30.0}, "davsn": {"miou": 40.0, "steps": 90}},
               "night": {"init": {"miou": 10.0}, "davsn": {"miou": 20.0, "steps": 90}}}
    text = uda_table(results, ["davsn"], ["fog", "night"])
    assert "| init | 30.0 | 10.0 | 20.0 | – |" in text
    assert "| davsn | 40.0 | 20.0 | 30.0 | 90 |" in text
