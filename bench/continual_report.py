"""The pure parts of ``bench/continual.py``: the stream plan, served-mIoU scoring, round accounting,
the report's table and its target checks. No server, no torch; tested on hand-made results.

Definitions used in the report:
* a segment's served mIoU: mIoU of the label maps the server returned for the segment's frames,
  pooled over the segment (one confusion matrix), against the generator's labels;
* overall: the mean of the segment mIoUs (segments have equal length, so each style counts as often
  as it occurs); ``pooled`` (one confusion matrix over the whole stream) is reported too;
* the base: configuration ``none`` (the bundled model throughout) on the same frames.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptation.metrics import confusion_matrix, miou

SEGMENTS = ("source", "fog", "night", "source", "noise-blur", "fog", "recolor", "source")
STREAM_SEED = 700_000  # seeds of the streamed clips: STREAM_SEED + 1000 * segment + k
HELDOUT_SEED = 900_000  # held-out labeled clips per style for scoring rounds: HELDOUT_SEED + 1000 * style + k
FINAL = ("published", "rejected", "failed", "cancelled")


@dataclass(frozen=True)
class Plan:
    """A stream of ``len(segments)`` equal segments, each ``clips_per_segment`` generated clips of
    ``clip_frames`` consecutive frames; frame i is at stream time i / camera_fps seconds."""

    segments: tuple[str, ...]
    clips_per_segment: int
    clip_frames: int
    camera_fps: float
    size: tuple[int, int]

    @property
    def frames_per_segment(self) -> int:
        return self.clips_per_segment * self.clip_frames

    @property
    def frames(self) -> int:
        return self.frames_per_segment * len(self.segments)

    @property
    def stream_s(self) -> float:
        return self.frames / self.camera_fps

    def segment_of(self, frame: int) -> int:
        return min(frame // self.frames_per_segment, len(self.segments) - 1)

    def clip_seed(self, segment: int, k: int) -> int:
        return STREAM_SEED + 1000 * segment + k

    def to_dict(self) -> dict[str, Any]:
        return {"segments": list(self.segments), "clips_per_segment": self.clips_per_segment,
                "clip_frames": self.clip_frames, "camera_fps": self.camera_fps, "size": list(self.size),
                "frames": self.frames, "stream_minutes": round(self.stream_s / 60, 2)}


def make_plan(minutes: float, camera_fps: float, clip_frames: int, size: tuple[int, int],
              segments: tuple[str, ...] = SEGMENTS) -> Plan:
    """At least ``minutes`` of stream time at ``camera_fps``, rounded up to whole clips per segment."""
    if minutes <= 0 or camera_fps <= 0 or clip_frames < 2:
        raise ValueError("minutes and camera_fps must be positive and clip_frames at least 2")
    per_segment = minutes * 60 * camera_fps / len(segments)
    return Plan(tuple(segments), max(1, math.ceil(per_segment / clip_frames)), clip_frames, camera_fps, size)


class ServedScore:
    """Confusion matrices of what was served, per segment and per clip window, and the versions seen."""

    def __init__(self, plan: Plan, num_classes: int) -> None:
        self.plan, self.n = plan, num_classes
        self.segments = np.zeros((len(plan.segments), num_classes, num_classes), np.int64)
        self.windows = np.zeros((plan.frames // plan.clip_frames, num_classes, num_classes), np.int64)
        self.versions: list[Counter[str]] = [Counter() for _ in plan.segments]
        self.frames = 0

    def add(self, frame: int, pred: np.ndarray, label: np.ndarray, version: str) -> None:
        conf = confusion_matrix(pred, label, self.n)
        self.segments[self.plan.segment_of(frame)] += conf
        self.windows[frame // self.plan.clip_frames] += conf
        self.versions[self.plan.segment_of(frame)][version] += 1
        self.frames += 1

    def summary(self) -> dict[str, Any]:
        p = self.plan
        segs: list[dict[str, Any]] = []
        for i, style in enumerate(p.segments):
            start, length = i * p.frames_per_segment / p.camera_fps, p.frames_per_segment / p.camera_fps
            segs.append({"index": i, "style": style, "start_s": start, "end_s": start + length,
                         "miou": _m(self.segments[i]), "versions": dict(self.versions[i])})
        windows = [{"start_s": w * p.clip_frames / p.camera_fps, "end_s": (w + 1) * p.clip_frames / p.camera_fps,
                    "segment": p.segment_of(w * p.clip_frames), "miou": _m(conf)}
                   for w, conf in enumerate(self.windows) if conf.sum() > 0]
        scored = [float(s["miou"]) for s in segs if s["miou"] is not None]
        return {"frames_scored": self.frames, "segments": segs, "windows": windows,
                "overall": round(float(np.mean(scored)), 2) if scored else None,
                "pooled": _m(self.segments.sum(0))}


def _m(conf: np.ndarray) -> float | None:
    value = miou(conf)["miou"]
    assert isinstance(value, float)
    return round(value, 2) if conf.sum() > 0 else None


def stream_time(timeline: list[tuple[float, float]], epoch: float | None) -> float | None:
    """Stream seconds at wall-clock ``epoch``, from (epoch, stream seconds) pairs of frames sent, in order."""
    if epoch is None or not timeline:
        return None
    i = bisect.bisect_right([t for t, _ in timeline], epoch)
    return timeline[max(i - 1, 0)][1]


def clip_segments(ids: list[str], timeline: list[tuple[float, float]], plan: Plan) -> list[int]:
    """The segment each buffered clip was sampled in: a clip id starts with its creation time in ns
    (``service.buffer``), just after its last frame was served."""
    out = []
    for clip_id in ids:
        head = clip_id.split("-", 1)[0]
        at = stream_time(timeline, int(head) / 1e9) if head.isdigit() else None
        if at is not None:
            out.append(plan.segment_of(int(round(at * plan.camera_fps))))
    return out


def rounds(jobs: list[dict[str, Any]], timeline: list[tuple[float, float]], plan: Plan) -> dict[str, Any]:
    """Every job with the stream time it was created and ended at, its segment (where most of its training
    clips come from; else where it was created), and counts by state."""
    out = []
    for job in sorted(jobs, key=lambda j: j.get("created") or 0.0):
        created = stream_time(timeline, job.get("created"))
        ended = stream_time(timeline, job.get("finished"))
        trained = clip_segments(((job.get("clips") or {}).get("ids") or {}).get("train") or [], timeline, plan)
        segment = plan.segment_of(int(created * plan.camera_fps)) if created is not None else None
        if trained:  # the style the round trained on: the segment most of its clips were sampled in
            segment = Counter(trained).most_common(1)[0][0]
        gate = job.get("gate") or {}
        out.append({"id": job["id"], "trigger": job.get("trigger"), "state": job["state"],
                    "method": (job.get("request") or {}).get("method"), "parent": job.get("parent"),
                    "version": job.get("version"), "created_s": created, "ended_s": ended, "segment": segment,
                    "style": plan.segments[segment] if segment is not None else None,
                    "clip_segments": dict(Counter(trained)),
                    "gate_passed": gate.get("passed"), "gate_reasons": gate.get("reasons"),
                    "stat_gate": (gate.get("metrics") or {}).get("stat_gate")})
    states = Counter(r["state"] for r in out)
    return {"started": len(out), "published": states["published"], "rejected": states["rejected"],
            "failed": states["failed"], "cancelled": states["cancelled"],
            "unfinished": sum(states[s] for s in states if s not in FINAL), "list": out}


def gate_errors(scored: list[dict[str, Any]]) -> dict[str, Any]:
    """The gate's errors, from rounds whose parent and candidate were scored on held-out labeled clips.

    Each item has ``state``, ``gate_passed`` (what the gate said; with the gate off the round was published
    anyway) and ``parent_miou``/``candidate_miou`` (None when the candidate was not kept: a rejected round
    of a gated configuration). A false publish: the gate passed a candidate that is worse than its parent;
    a false rejection: it failed one that is better.
    """
    have = [r for r in scored if r.get("candidate_miou") is not None and r.get("parent_miou") is not None]
    passed = [r for r in have if r.get("gate_passed")]
    failed = [r for r in have if r.get("gate_passed") is False]
    worse = [r for r in passed if r["candidate_miou"] < r["parent_miou"]]
    better = [r for r in failed if r["candidate_miou"] > r["parent_miou"]]
    return {"published_scored": len(passed), "published_worse": len(worse),
            "published_worse_by": [round(r["candidate_miou"] - r["parent_miou"], 2) for r in worse],
            "rejected_scored": len(failed), "rejected_better": len(better),
            "rejected_better_by": [round(r["candidate_miou"] - r["parent_miou"], 2) for r in better],
            "rejected_unscored": sum(r["state"] == "rejected" and r.get("candidate_miou") is None for r in scored)}


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def compare(results: dict[str, dict[str, Any]], base: str = "none") -> dict[str, dict[str, Any]]:
    """Per configuration: worst segment vs ``base``, source segments vs ``base``, the last source segment."""
    ref = results[base]["served"]["segments"]
    out = {}
    for name, res in results.items():
        segs = res["served"]["segments"]
        deltas = [_delta(s["miou"], r["miou"]) for s, r in zip(segs, ref, strict=True)]
        known = [(d, i) for i, d in enumerate(deltas) if d is not None]
        worst = min(known) if known else (None, None)
        source = [(d, i) for d, i in known if segs[i]["style"] == "source"]
        last = max((i for i, s in enumerate(segs) if s["style"] == "source"), default=None)
        out[name] = {"segment_delta": deltas, "worst_delta": worst[0], "worst_segment": worst[1],
                     "source_worst_delta": min(source)[0] if source else None,
                     "last_source": segs[last]["miou"] if last is not None else None,
                     "last_source_base": ref[last]["miou"] if last is not None else None,
                     "overall_delta": _delta(res["served"]["overall"], results[base]["served"]["overall"])}
    return out


def checks(results: dict[str, dict[str, Any]], policy: str = "full", base: str = "none",
           tolerance: float = 1.0) -> dict[str, bool]:
    """The issue's targets, each as a sentence with its measured number -> met or not."""
    if policy not in results or base not in results:
        return {}
    cmp = compare(results, base)[policy]
    overall = {n: r["served"]["overall"] for n, r in results.items()}
    others = {n: v for n, v in overall.items() if n != policy and v is not None}
    out: dict[str, bool] = {}
    if others and overall[policy] is not None:
        best = max(others, key=lambda n: others[n])
        margin = overall[policy] - others[best]
        out[f"{policy} ahead of every baseline in overall served mIoU ({margin:+.1f} vs {best})"] = margin > 0
    if cmp["worst_delta"] is not None:
        seg = results[policy]["served"]["segments"][cmp["worst_segment"]]
        out[f"{policy}: no segment more than {tolerance:g} point below {base} (worst {cmp['worst_delta']:+.1f}, "
            f"segment {cmp['worst_segment'] + 1} {seg['style']})"] = cmp["worst_delta"] >= -tolerance
    if cmp["source_worst_delta"] is not None:
        worst = cmp["source_worst_delta"]
        text = f"{policy}: source segments within {tolerance:g} point of the base (worst {worst:+.1f})"
        out[text] = worst >= -tolerance
    errors = results[policy].get("gate_errors")
    if errors is not None and errors["published_scored"]:
        out[f"{policy}: no published round worse than its parent on held-out clips "
            f"({errors['published_worse']} of {errors['published_scored']})"] = errors["published_worse"] == 0
    return out


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def table(results: dict[str, dict[str, Any]], base: str = "none") -> str:
    """Markdown: served mIoU per segment and overall, deltas to the base, rounds per configuration."""
    names = list(results)
    segs = results[names[0]]["served"]["segments"]
    cmp = compare(results, base) if base in results else {}
    head = ["config"] + [f"{i + 1} {s['style']}" for i, s in enumerate(segs)] + \
        ["overall", "worst vs none", "last source (base)", "rounds started / published / rejected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        res, c = results[name], cmp.get(name, {})
        r = res.get("rounds") or {}
        worst = "–" if c.get("worst_delta") is None else f"{c['worst_delta']:+.1f} ({c['worst_segment'] + 1})"
        last = f"{_f(c.get('last_source'))} ({_f(c.get('last_source_base'))})" if c else "–"
        cells = [name] + [_f(s["miou"]) for s in res["served"]["segments"]] + \
            [f"**{_f(res['served']['overall'])}**", worst, last,
             f"{r.get('started', 0)} / {r.get('published', 0)} / {r.get('rejected', 0)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
