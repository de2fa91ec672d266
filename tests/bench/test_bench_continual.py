"""bench/continual.py: the report logic on hand-made results, and a tiny smoke run through real servers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bench.continual import config_env, main, parse_args
from bench.continual_plot import color, plot
from bench.continual_report import SEGMENTS, ServedScore, checks, compare, gate_errors, make_plan, rounds, table


def test_plan_covers_the_minutes_in_whole_clips():
    plan = make_plan(30, 0.5, 16, (256, 512))
    assert plan.segments == SEGMENTS and plan.clips_per_segment == 8  # 900 frames / 8 segments -> 113 -> 8 clips
    assert plan.frames == 1024 and plan.stream_s >= 30 * 60
    assert plan.segment_of(0) == 0 and plan.segment_of(127) == 0 and plan.segment_of(128) == 1
    assert plan.segment_of(10_000) == 7
    with pytest.raises(ValueError):
        make_plan(0, 1, 16, (8, 8))


def test_served_score_per_segment_and_window():
    plan = make_plan(1, 1.0, 2, (2, 2), ("source", "fog"))  # 60 frames -> 15 clips of 2 per segment
    score = ServedScore(plan, 3)
    label = np.array([[0, 1], [2, 2]], np.uint8)
    for f in range(plan.frames):
        pred = label if plan.segment_of(f) == 0 else np.zeros_like(label)
        score.add(f, pred, label, "v0001" if f < 40 else "v0002")
    s = score.summary()
    assert s["segments"][0]["miou"] == 100.0
    assert s["segments"][1]["miou"] == pytest.approx(100 / 3 * 0.25 / 1, abs=0.01)  # class 0: 1/4, others 0
    assert s["overall"] == pytest.approx((100 + 8.33) / 2, abs=0.01)
    assert s["segments"][1]["versions"] == {"v0001": 10, "v0002": 20}
    assert len(s["windows"]) == 30 and s["windows"][15]["segment"] == 1 and s["windows"][1]["start_s"] == 2.0


def _result(segs: list[float], jobs: dict | None = None, worse: int = 0) -> dict:
    styles = ["source", "fog", "source"]
    return {"served": {"segments": [{"style": st, "miou": m, "start_s": 60.0 * i, "end_s": 60.0 * (i + 1)}
                                    for i, (st, m) in enumerate(zip(styles, segs, strict=True))],
                       "windows": [{"start_s": 60.0 * i, "end_s": 60.0 * (i + 1), "segment": i, "miou": m}
                                   for i, m in enumerate(segs)],
                       "overall": round(sum(segs) / len(segs), 2)},
            "rounds": jobs or {"started": 0, "published": 0, "rejected": 0, "list": []},
            "gate_errors": {"published_scored": 2, "published_worse": worse}}


def test_checks_compare_and_table():
    results = {"none": _result([90.0, 20.0, 90.0]), "always": _result([85.0, 50.0, 80.0]),
               "full": _result([89.5, 45.0, 89.2], {"started": 3, "published": 2, "rejected": 1, "list": []})}
    cmp = compare(results)
    assert cmp["always"]["worst_delta"] == -10.0 and cmp["always"]["worst_segment"] == 2
    assert cmp["full"]["source_worst_delta"] == -0.8 and cmp["full"]["last_source"] == 89.2
    got = checks(results)
    assert got == {"full ahead of every baseline in overall served mIoU (+2.9 vs always)": True,
                   "full: no segment more than 1 point below none (worst -0.8, segment 3 source)": True,
                   "full: source segments within 1 point of the base (worst -0.8)": True,
                   "full: no published round worse than its parent on held-out clips (0 of 2)": True}
    results["full"] = _result([88.0, 30.0, 90.0], worse=1)
    got = checks(results)
    assert got["full ahead of every baseline in overall served mIoU (-2.3 vs always)"] is False
    assert got["full: source segments within 1 point of the base (worst -2.0)"] is False
    assert got["full: no published round worse than its parent on held-out clips (1 of 2)"] is False
    text = table({"none": results["none"], "full": _result([89.5, 45.0, 89.2], {"started": 3, "published": 2,
                                                                                 "rejected": 1, "list": []})})
    assert "| config | 1 source | 2 fog | 3 source | overall |" in text
    assert "| full | 89.5 | 45.0 | 89.2 | **74.6** | -0.8 (3) | 89.2 (90.0) | 3 / 2 / 1 |" in text


def test_rounds_on_the_stream_clock_and_gate_errors():
    plan = make_plan(2, 1.0, 2, (2, 2), ("source", "fog"))  # 60 frames per segment
    timeline = [(1000.0 + f, float(f)) for f in range(plan.frames)]  # frame f sent at epoch 1000 + f
    jobs = [{"id": "b", "state": "rejected", "created": 1070.5, "finished": 1090.0, "gate": {"passed": False}},
            {"id": "a", "state": "published", "created": 1010.2, "finished": 1040.0, "parent": "v0001",
             "version": "v0002", "request": {"method": "tent"}},
            {"id": "c", "state": "running", "created": 1115.0, "finished": None,
             "clips": {"ids": {"train": ["00000001050500000000-ab", "00000001049000000000-cd",
                                         "00000001080000000000-ef"], "heldout": []}}}]
    r = rounds(jobs, timeline, plan)
    assert [j["id"] for j in r["list"]] == ["a", "b", "c"]
    assert (r["started"], r["published"], r["rejected"], r["unfinished"]) == (3, 1, 1, 1)
    assert r["list"][0]["created_s"] == 10.0 and r["list"][0]["style"] == "source" and r["list"][0]["method"] == "tent"
    assert r["list"][1]["segment"] == 1 and r["list"][1]["ended_s"] == 90.0 and r["list"][2]["ended_s"] is None
    # c was created in segment 1 but trained mostly on clips sampled in segment 0 (at 50 s and 49 s)
    assert r["list"][2]["style"] == "source" and r["list"][2]["clip_segments"] == {0: 2, 1: 1}
    scored = [{"state": "published", "gate_passed": True, "parent_miou": 50.0, "candidate_miou": 49.0},
              {"state": "published", "gate_passed": True, "parent_miou": 50.0, "candidate_miou": 60.0},
              {"state": "published", "gate_passed": False, "parent_miou": 50.0, "candidate_miou": 55.0},  # gate off
              {"state": "published", "gate_passed": False, "parent_miou": 50.0, "candidate_miou": 45.0},
              {"state": "rejected", "gate_passed": False, "parent_miou": None, "candidate_miou": None}]
    assert gate_errors(scored) == {"published_scored": 2, "published_worse": 1, "published_worse_by": [-1.0],
                                   "rejected_scored": 2, "rejected_better": 1, "rejected_better_by": [5.0],
                                   "rejected_unscored": 1}


def test_plot_marks_gate_decisions(tmp_path):
    jobs = {"started": 2, "published": 1, "rejected": 1,
            "list": [{"state": "published", "ended_s": 90.0}, {"state": "rejected", "ended_s": 150.0}]}
    results = {"none": _result([90.0, 20.0, 90.0]), "full": _result([89.5, 45.0, 89.2], jobs)}
    path = plot(results, tmp_path / "p" / "plot.png", size=(600, 300))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (300, 600, 3)
    full = np.all(img == color("full", 0), axis=-1)
    assert full.sum() > 50  # its line, legend and markers are drawn in its colour
    assert np.all(img == color("none", 0), axis=-1).sum() > 20


def test_configuration_environments_follow_the_contract():
    args = parse_args(["--configs", "none,always,reset,cotta,full", "--method", "stpl", "--reset-every", "3",
                       "--env", "VSS_ADAPT_AUTO_DISTANCE=0.5"])
    assert config_env("none", args)["VSS_ADAPT_AUTO"] == "0"
    always = config_env("always", args)
    assert (always["VSS_ADAPT_AUTO"], always["VSS_ADAPT_DOMAINS"], always["VSS_ADAPT_GATE"]) == ("1", "0", "off")
    assert always["VSS_ADAPT_AUTO_METHOD"] == "stpl" and always["VSS_ADAPT_AUTO_DISTANCE"] == "0.5"
    assert config_env("reset", args)["VSS_ADAPT_RESET_EVERY"] == "3"
    assert config_env("cotta", args)["VSS_ADAPT_AUTO_METHOD"] == "cotta"
    full = config_env("full", args)
    assert (full["VSS_ADAPT_DOMAINS"], full["VSS_ADAPT_GATE"], full["VSS_ADAPT_AUTO_METHOD"]) == ("1", "stat", "stpl")
    with pytest.raises(SystemExit):
        parse_args(["--configs", "full"])  # the base (none) is required
    with pytest.raises(SystemExit):
        parse_args(["--env", "NOT_VSS=1"])


def test_smoke_run_through_real_servers(tmp_path, capsys):
    """The short version end to end on a tiny stream: two real servers, JSON, table and plot written."""
    out = tmp_path / "out"
    assert main(["--minutes", "0.5", "--configs", "none,full", "--size", "64x128", "--clip-frames", "2",
                 "--segment-wall-s", "0", "--heldout-clips", "1", "--work", str(tmp_path / "work"),
                 "--out", str(out)]) == 0
    report = json.loads((out / "continual.json").read_text())
    assert report["plan"]["frames"] == 16 and set(report["configs"]) == {"none", "full"}
    for res in report["configs"].values():
        served = res["served"]
        assert served["frames_scored"] == 16 and len(served["segments"]) == 8
        assert all(s["miou"] is not None and sum(s["versions"].values()) == 2 for s in served["segments"])
        assert set(res["rounds"]) >= {"started", "published", "rejected", "list"}
        assert set(res["gate_errors"]) >= {"published_scored", "published_worse", "rejected_better"}
        assert res["frames_out_of_order"] == 0
    assert report["compare"]["none"]["worst_delta"] == 0.0
    assert "| none |" in (out / "continual.md").read_text()
    assert Image.open(out / "continual.png").size == (1200, 520)
    assert "continual.json" in capsys.readouterr().out
