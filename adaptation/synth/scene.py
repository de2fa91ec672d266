"""Procedural street layout: cross-section, building/hedge tables along the road, and moving bodies.

The street runs along world +z. Everything static is described exactly by tables over z (bins of
`Strip.res` metres, building edges snapped to bin edges), so a ray's hit is decided by one lookup.
Trees, cars and persons are "bodies": rigid groups of boxes, vertical cylinders and spheres that
translate with a constant velocity.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .core import Surface
from .styles import Layout

LANE = 3.5  # lane width in metres; lane markings sit on multiples of it
PARKING = 2.3  # width of a parking strip
LEFT, RIGHT = 0, 1


class Shape(IntEnum):
    BOX = 0  # a = lo corner (body-local), b = edge lengths
    CYLINDER = 1  # vertical; a = base centre, b = (radius, height, -)
    SPHERE = 2  # a = centre, b = (radius, -, -)


@dataclass(frozen=True)
class Street:
    """Cross-section; every per-side array is (2,) = (left, right), as positive distances from x = 0."""

    road: np.ndarray
    walk: np.ndarray  # outer edge of the sidewalk
    hedge: np.ndarray  # hedge plane
    facade: np.ndarray  # front plane of the first building row
    depth: np.ndarray  # depth of first-row buildings
    backdrop: np.ndarray  # front plane of the second building row

    @property
    def ground_edges(self) -> np.ndarray:
        return np.array([-self.walk[LEFT], -self.road[LEFT], self.road[RIGHT], self.walk[RIGHT]], np.float32)


@dataclass(frozen=True)
class Strip:
    """Tables over z, shape (2, n): row LEFT / RIGHT; bin i covers [z0 + i*res, z0 + (i+1)*res)."""

    z0: float
    res: float
    front_h: np.ndarray  # first-row building height, 0 in gaps
    front_id: np.ndarray
    next_z: np.ndarray  # start of the next first-row building (its side wall faces -z)
    next_h: np.ndarray
    next_id: np.ndarray
    back_h: np.ndarray
    back_id: np.ndarray
    hedge_h: np.ndarray

    @functools.cached_property
    def facade_rows(self) -> np.ndarray:
        """(2, n, 8) float32: front_h, next_z, next_h, front_id, next_id per bin, padded to 8 columns so
        that one fast gather fetches everything a facade crossing needs."""
        return _pack(self.front_h, self.next_z, self.next_h, self.front_id, self.next_id, width=8)

    @functools.cached_property
    def backdrop_rows(self) -> np.ndarray:
        """(2, n, 2) float32: back_h, back_id per bin."""
        return _pack(self.back_h, self.back_id, width=2)


def _pack(*tables: np.ndarray, width: int) -> np.ndarray:
    rows = np.zeros(tables[0].shape + (width,), np.float32)
    for c, table in enumerate(tables):
        rows[..., c] = table
    rows.setflags(write=False)
    return rows


@dataclass(frozen=True)
class Bodies:
    """N rigid bodies made of P parts (primitives in body-local coordinates)."""

    origin: np.ndarray  # (N, 3) position at frame 0
    velocity: np.ndarray  # (N, 3) metres per second
    inst: np.ndarray  # (N,) instance id 1..255 (colour variation)
    part_body: np.ndarray  # (P,) owning body of each part
    shape: np.ndarray  # (P,)
    a: np.ndarray  # (P, 3)
    b: np.ndarray  # (P, 3)
    surfaces: np.ndarray  # (P, 3) surface per face kind: box (x, y, z normal); cylinder (side, cap); sphere
    lo: np.ndarray  # (P, 3) part bounding box, body-local
    hi: np.ndarray

    def positions(self, t: float) -> np.ndarray:
        """(N, 3) positions at time t seconds after frame 0."""
        return self.origin + self.velocity * t

    def __len__(self) -> int:
        return len(self.origin)


@dataclass(frozen=True)
class Scene:
    street: Street
    strip: Strip
    bodies: Bodies
    lamps: np.ndarray  # (K, 3) street-lamp heads, used by the night lighting only


class _BodyList:
    """Accumulates bodies part by part before freezing them into `Bodies`."""

    def __init__(self) -> None:
        self.rows: list[tuple[np.ndarray, np.ndarray, int, list[tuple[int, tuple, tuple, tuple]]]] = []

    def add(self, origin: tuple, velocity: tuple, inst: int, parts: list[tuple[int, tuple, tuple, tuple]]) -> None:
        self.rows.append((np.asarray(origin, float), np.asarray(velocity, float), inst, parts))

    def freeze(self) -> Bodies:
        parts = [p for row in self.rows for p in row[3]]
        bounds = [_part_bounds(p) for p in parts]
        f32 = np.float32
        return Bodies(
            origin=np.array([r[0] for r in self.rows], float).reshape(-1, 3),
            velocity=np.array([r[1] for r in self.rows], float).reshape(-1, 3),
            inst=np.array([r[2] for r in self.rows], np.int32),
            part_body=np.repeat(np.arange(len(self.rows)), [len(r[3]) for r in self.rows]).astype(np.int64),
            shape=np.array([p[0] for p in parts], np.int8),
            a=np.array([p[1] for p in parts], f32).reshape(-1, 3),
            b=np.array([p[2] for p in parts], f32).reshape(-1, 3),
            surfaces=np.array([p[3] for p in parts], np.uint8).reshape(-1, 3),
            lo=np.array([b[0] for b in bounds], float).reshape(-1, 3),
            hi=np.array([b[1] for b in bounds], float).reshape(-1, 3),
        )


def _part_bounds(part: tuple[int, tuple, tuple, tuple]) -> tuple[np.ndarray, np.ndarray]:
    shape, a, b = part[0], np.asarray(part[1], float), np.asarray(part[2], float)
    if shape == Shape.BOX:
        return a, a + b
    if shape == Shape.CYLINDER:
        return a - [b[0], 0, b[0]], a + [b[0], b[1], b[0]]
    return a - b[0], a + b[0]


def _segments(rng: np.random.Generator, z_lo: float, z_hi: float, width: tuple[float, float],
              gap: tuple[float, float], gap_prob: float, res: float) -> list[tuple[int, int]]:
    """Occupied bin ranges [i0, i1) along z, alternating with random gaps."""
    out, z = [], z_lo + rng.uniform(0, width[1])
    while z < z_hi:
        w = rng.uniform(*width)
        out.append((int((z - z_lo) / res), int((z + w - z_lo) / res)))
        z += w + (rng.uniform(*gap) if rng.random() < gap_prob else 0.0)
    return out


def _fill(table: np.ndarray, ids: np.ndarray | None, segs: list[tuple[int, int]], values: np.ndarray,
          id_base: int) -> None:
    for k, (i0, i1) in enumerate(segs):
        table[i0:i1] = values[k]
        if ids is not None:
            ids[i0:i1] = 1 + (id_base + k) % 255


def _strip(rng: np.random.Generator, layout: Layout, street: Street, z_lo: float, z_hi: float) -> Strip:
    res = 0.25
    n = int(np.ceil((z_hi - z_lo) / res)) + 2
    tables = {k: np.zeros((2, n), np.float32) for k in ("front_h", "next_z", "next_h", "back_h", "hedge_h")}
    ids = {k: np.zeros((2, n), np.int32) for k in ("front_id", "next_id", "back_id")}
    h_lo, h_hi = layout.building_height
    for side in (LEFT, RIGHT):
        front = _segments(rng, z_lo, z_hi, (8.0, 30.0), (3.0, 14.0), layout.gap_prob, res)
        heights = rng.uniform(h_lo, h_hi, len(front))
        _fill(tables["front_h"][side], ids["front_id"][side], front, heights, 60 * side)
        starts = np.array([s[0] for s in front] + [n + 10])
        nxt = np.searchsorted(starts, np.arange(n), side="right")
        tables["next_z"][side] = z_lo + starts[nxt] * res
        tables["next_h"][side] = np.append(heights, 0.0)[nxt]
        ids["next_id"][side] = np.append(1 + (60 * side + np.arange(len(front))) % 255, 0)[nxt]
        back = _segments(rng, z_lo, z_hi, (10.0, 40.0), (5.0, 20.0), 0.5 * layout.gap_prob, res)
        _fill(tables["back_h"][side], ids["back_id"][side], back, rng.uniform(1.2 * h_lo, 1.8 * h_hi, len(back)),
              120 + 60 * side)
        if street.hedge[side] < street.facade[side] - 0.2:
            hedges = _segments(rng, z_lo, z_hi, (5.0, 30.0), (4.0, 25.0), 1.0, res)
            hedges = [seg for seg in hedges if rng.random() < layout.hedge_prob]
            _fill(tables["hedge_h"][side], None, hedges, rng.uniform(0.7, 1.3, len(hedges)), 0)
    for t in tables.values():  # the first and last bins are empty: everything beyond is open
        t[:, [0, -1]] = 0.0
    tables["next_z"][:, [0, -1]] = np.inf
    return Strip(z_lo, res, **tables, **ids)


def _street(rng: np.random.Generator, layout: Layout) -> Street:
    road = LANE + np.where(rng.random(2) < layout.parking_prob, PARKING, 0.0)
    walk = road + rng.uniform(2.0, 4.5, 2)
    verge = np.where(rng.random(2) < 0.6, rng.uniform(1.0, 5.0, 2), 0.0)
    facade = walk + verge
    depth = rng.uniform(8.0, 16.0, 2)
    return Street(road, walk, walk + 0.6 * verge, facade, depth, facade + depth + rng.uniform(4.0, 15.0, 2))


def _poisson(rng: np.random.Generator, z_lo: float, z_hi: float, spacing: float, min_gap: float) -> np.ndarray:
    n = int((z_hi - z_lo) / max(min_gap, 1e-3)) + 1
    steps = min_gap + rng.exponential(max(spacing - min_gap, 1e-3), n)
    z = z_lo + rng.uniform(0, spacing) + np.cumsum(steps) - steps[0]
    return z[z < z_hi]


def _add_trees(rng: np.random.Generator, out: _BodyList, layout: Layout, street: Street, z_lo: float,
               z_hi: float) -> None:
    for side, sign in ((LEFT, -1.0), (RIGHT, 1.0)):
        verge = street.facade[side] - street.walk[side]
        x = sign * (street.walk[side] + 0.5 * verge if verge > 1.5 else street.walk[side] - 0.7)
        for z in _poisson(rng, z_lo, z_hi, 14.0 / max(layout.tree_density, 1e-3), 5.0):
            r, trunk_r, trunk_h = rng.uniform(1.3, 2.6), rng.uniform(0.12, 0.25), rng.uniform(2.0, 3.5)
            parts = [(Shape.CYLINDER, (0, 0, 0), (trunk_r, trunk_h + 0.5 * r, 0), (Surface.TRUNK, Surface.TRUNK, 0)),
                     (Shape.SPHERE, (0, trunk_h + 0.7 * r, 0), (r, 0, 0), (Surface.CROWN, 0, 0))]
            if rng.random() < 0.5:
                off = (rng.uniform(-0.6, 0.6) * r, trunk_h + rng.uniform(0.9, 1.3) * r, rng.uniform(-0.5, 0.5) * r)
                parts.append((Shape.SPHERE, off, (0.7 * r, 0, 0), (Surface.CROWN, 0, 0)))
            out.add((x + rng.uniform(-0.2, 0.2), 0, z), (0, 0, 0), int(rng.integers(1, 256)), parts)


def _car_parts(rng: np.random.Generator, scale: float, facing: float) -> list[tuple[int, tuple, tuple, tuple]]:
    length, width, body_h = rng.uniform(3.8, 4.8) * scale, rng.uniform(1.7, 1.9) * scale, rng.uniform(0.8, 0.95) * scale
    van = rng.random() < 0.15
    cab_l = length * (rng.uniform(0.75, 0.85) if van else rng.uniform(0.45, 0.6))
    cab_h = scale * (rng.uniform(0.8, 1.0) if van else rng.uniform(0.45, 0.6))
    cab_z = facing * (-0.5 * (length - cab_l) + 0.05 * length if van else rng.uniform(-0.15, 0.05) * length)
    cab_w = 0.46 * width
    body = (Shape.BOX, (-width / 2, 0, -length / 2), (width, body_h, length),
            (Surface.CAR_SIDE, Surface.CAR_TOP, Surface.CAR_END))
    cabin = (Shape.BOX, (-cab_w, body_h - 0.01, cab_z - cab_l / 2), (2 * cab_w, cab_h + 0.01, cab_l),
             (Surface.CAR_GLASS, Surface.CAR_TOP, Surface.CAR_GLASS))
    return [body, cabin]


def _add_cars(rng: np.random.Generator, out: _BodyList, layout: Layout, street: Street, z_lo: float, z_hi: float,
              ego_speed: tuple[float, float], duration: float) -> None:
    dens, scale = max(layout.car_density, 1e-3), layout.car_scale
    lane_speed = ego_speed[1] * rng.uniform(1.12, 1.3)
    for z in _poisson(rng, 12.0, z_hi, 30.0 / dens, 7.0 * scale):  # ahead in the ego lane, pulling away
        out.add((0.5 * LANE + rng.uniform(-0.2, 0.2), 0, z), (0, 0, lane_speed), int(rng.integers(1, 256)),
                _car_parts(rng, scale, 1.0))
    speed = rng.uniform(6.0, 12.0)
    for z in _poisson(rng, z_lo, z_hi + speed * duration, 35.0 / dens, 8.0 * scale):  # oncoming lane
        out.add((-0.5 * LANE + rng.uniform(-0.2, 0.2), 0, z), (0, 0, -speed), int(rng.integers(1, 256)),
                _car_parts(rng, scale, -1.0))
    for side, sign in ((LEFT, -1.0), (RIGHT, 1.0)):  # parked along the curb
        if street.road[side] > LANE + 1.0:
            for z in _poisson(rng, z_lo, z_hi, 9.0 / min(dens, 1.6), 5.2 * scale):
                if rng.random() < 0.75:
                    out.add((sign * (LANE + 1.1), 0, z), (0, 0, 0), int(rng.integers(1, 256)),
                            _car_parts(rng, min(scale, 1.15), sign))


def _add_persons(rng: np.random.Generator, out: _BodyList, layout: Layout, street: Street, z_lo: float,
                 z_hi: float, duration: float) -> None:
    scale = layout.person_scale
    for side, sign in ((LEFT, -1.0), (RIGHT, 1.0)):
        x_lo = street.road[side] + 0.4
        x_hi = max(x_lo + 0.1, street.walk[side] - 1.2)
        for z in _poisson(rng, z_lo - 3 * duration, z_hi, 11.0 / max(layout.person_density, 1e-3), 0.8):
            s = scale * rng.uniform(0.85, 1.1)
            r, h = rng.uniform(0.2, 0.26) * s, rng.uniform(1.35, 1.55) * s
            speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.8) if rng.random() < 0.8 else 0.0
            parts = [(Shape.CYLINDER, (0, 0, 0), (r, h, 0), (Surface.PERSON, Surface.PERSON, 0)),
                     (Shape.SPHERE, (0, h + 0.1 * s, 0), (0.11 * s, 0, 0), (Surface.HEAD, 0, 0))]
            out.add((sign * rng.uniform(x_lo, x_hi), 0, z), (0, 0, speed), int(rng.integers(1, 256)), parts)


def build_scene(rng: np.random.Generator, layout: Layout, z_end: float, duration: float,
                ego_speed: tuple[float, float]) -> Scene:
    """Random street for a camera that drives from z = 0 to `z_end` during `duration` seconds."""
    street = _street(rng, layout)
    strip = _strip(rng, layout, street, -40.0, z_end + 600.0)
    bodies = _BodyList()
    _add_trees(rng, bodies, layout, street, -30.0, z_end + 250.0)
    _add_cars(rng, bodies, layout, street, -30.0, z_end + 250.0, ego_speed, duration)
    _add_persons(rng, bodies, layout, street, -30.0, z_end + 200.0, duration)
    lamp_z = np.arange(-20.0 + rng.uniform(0, 25), z_end + 150.0, rng.uniform(22.0, 32.0))
    lamps = np.concatenate([np.stack([np.full_like(lamp_z, sign * (street.walk[side] - 0.3)),
                                      np.full_like(lamp_z, 6.5), lamp_z + 12.0 * side], -1)
                            for side, sign in ((LEFT, -1.0), (RIGHT, 1.0))])
    return Scene(street, strip, bodies.freeze(), lamps)
