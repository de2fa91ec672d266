"""Per-pixel ray casting: which surface each pixel shows, where on it, and its exact backward flow.

A frame is cast in two passes. The background (ground bands, hedges, building rows, side walls, sky)
is intersected analytically for every pixel through the `Strip` tables. Bodies (trees, cars, persons)
are then intersected inside the screen-space bounding box of each visible body and written where they
are closer (a depth buffer, so occlusion is exact in both directions). Flow comes from the hit point:
static points are re-projected with the previous camera, body points after undoing the body's motion,
sky directions with the previous rotation only.

Directions are kept planar, shape (3, H, W), so that every component is contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .camera import NEAR, Intrinsics, Trajectory, to_camera
from .core import Surface
from .scene import LEFT, RIGHT, Bodies, Scene, Shape

SKY_DEPTH = np.float32(1e7)  # distance given to the sky: far enough for fog and for re-projection
BODY_RANGE = (40.0, 450.0)  # bodies are drawn from this far behind to this far ahead of the camera (metres)
_GROUND = np.array([Surface.VERGE, Surface.SIDEWALK, Surface.ROAD, Surface.SIDEWALK, Surface.VERGE], np.uint8)
_BOX_CORNERS = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], float)
_BOX_EDGES = np.array([(i, i | bit) for i in range(8) for bit in (1, 2, 4) if not i & bit])


@dataclass
class GBuffer:
    depth: np.ndarray  # (H, W) float32 distance along the viewing ray
    surface: np.ndarray  # (H, W) uint8 `Surface`
    inst: np.ndarray  # (H, W) int32 instance id (0: none)
    u: np.ndarray  # (H, W) float32 surface coordinates in metres (sky: direction based)
    v: np.ndarray
    facing: np.ndarray  # (H, W) float32 cosine between the surface normal and the light direction
    flow: np.ndarray  # (2, H, W) float32 backward flow (dx, dy)
    prev_z: np.ndarray  # (H, W) float32 camera-space depth of the shown point in the previous frame


def world_directions(rays: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Planar (3, H, W) world directions from planar camera rays (einsum: no BLAS threads)."""
    return np.einsum("ij,j...->i...", rot.astype(np.float32), rays)


def render_gbuffer(scene: Scene, traj: Trajectory, t: int, intr: Intrinsics, rays: np.ndarray,
                   light: np.ndarray) -> GBuffer:
    """Cast frame t (t >= 0; frame t - 1 may be the virtual frame -1). `rays`: planar camera rays."""
    origin, rot = traj.pose(t)
    prev_origin, prev_rot = traj.pose(t - 1)
    dirs = world_directions(rays, rot)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gb = _background(scene, origin, dirs, light)
        shift = (origin - prev_origin).astype(np.float32)
        rel = gb.depth * dirs + shift[:, None, None]
        gb.flow, gb.prev_z = _reproject(rel, prev_rot, intr, 0, 0)
        _draw_bodies(scene.bodies, t * traj.dt, traj.dt, origin, rot, shift, prev_rot, dirs, gb, intr, light)
    return gb


def _reproject(rel: np.ndarray, prev_rot: np.ndarray, intr: Intrinsics, row0: int | np.ndarray,
               col0: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flow and previous camera depth of points at world offsets `rel` (3, ...) from the previous camera.

    `rel` is either planar (3, H, W) with pixel (row0 + i, col0 + j), or (3, n) with pixels (row0, col0).
    """
    cam = np.einsum("ji,j...->i...", prev_rot.astype(np.float32), rel)
    inv = intr.focal / np.maximum(cam[2], NEAR)
    h, w = rel.shape[1:] if rel.ndim == 3 else (None, None)
    if h is not None:
        col0 = col0 + np.arange(w, dtype=np.float32)[None, :]
        row0 = row0 + np.arange(h, dtype=np.float32)[:, None]
    flow = np.stack([intr.cx + cam[0] * inv - col0, intr.cy - cam[1] * inv - row0]).astype(np.float32)
    return flow, cam[2]


def _background(scene: Scene, origin: np.ndarray, dirs: np.ndarray, light: np.ndarray) -> GBuffer:
    """Ground bands and sky for every pixel, then the side planes where a ray can reach them first."""
    street = scene.street
    ox, oy, oz = (float(c) for c in origin)
    dx, dy, dz = dirs
    down = dy < -1e-6
    depth = np.where(down, oy / -dy, SKY_DEPTH)
    xg, zg = ox + depth * dx, oz + depth * dz
    edges = street.ground_edges
    band = (xg >= edges[0]).astype(np.uint8) + (xg >= edges[1]) + (xg >= edges[2]) + (xg >= edges[3])
    surface = np.where(down, np.take(_GROUND, band), np.uint8(Surface.SKY))
    u = np.where(down, xg, dx / dz)
    v = np.where(down, zg, dy)
    facing = np.where(down, np.float32(light[1]), np.float32(1.0))
    inst = np.zeros(depth.shape, np.int32)
    views = (depth, surface, u, v, inst, facing)
    inner = np.minimum(street.hedge, street.facade)
    for side, beyond in ((LEFT, xg <= -inner[LEFT]), (RIGHT, xg >= inner[RIGHT])):
        # Only rows with a ray that misses the ground before this side's nearest plane need the planes.
        facing_side = (dx < 0) if side == LEFT else (dx > 0)
        reach = facing_side & (beyond | ~down)
        rows = np.flatnonzero(reach.any(axis=1))
        cols = np.flatnonzero(reach.any(axis=0))
        if len(rows) == 0:
            continue
        block = (slice(0, rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        hits = _side_hits(scene, side, (ox, oy, oz), dirs[(slice(None), *block)], light)
        closer = hits[0] < depth[block]
        for dst, src in zip(views, hits, strict=True):
            np.copyto(dst[block], src, where=closer, casting="unsafe")
    return GBuffer(depth, surface, inst, u, v, facing, None, None)


_SIDE_SURFACES = np.array([Surface.SKY, Surface.HEDGE, Surface.FACADE, Surface.SIDEWALL, Surface.BACKDROP], np.uint8)


def _side_hits(scene: Scene, side: int, origin: tuple[float, float, float], dirs: np.ndarray,
               light: np.ndarray) -> tuple[np.ndarray, ...]:
    """(t, surface, u, v, inst, facing) of the hedges, facades, side walls and second row on one side.

    Along a ray the planes of one side come in a fixed order (hedge, facade, side wall, second row),
    so the first one hit is the visible one; `t` is inf where none is hit.
    """
    street, strip = scene.street, scene.strip
    ox, oy, oz = origin
    dx, dy, dz = dirs
    sign = np.float32(1.0 if side == RIGHT else -1.0)
    inv_dx = 1.0 / np.where(dx * sign > 1e-7, dx, sign * np.float32(1e-7))  # wrong side: hits nothing
    inv_res, z0 = np.float32(1.0 / strip.res), np.float32(strip.z0)

    def plane(dist: float, heights: np.ndarray) -> tuple[np.ndarray, ...]:
        tp = (sign * np.float32(dist) - ox) * inv_dx
        y, z = oy + tp * dy, oz + tp * dz
        idx = ((z - z0) * inv_res).astype(np.int32)
        return tp, idx, (y >= 0) & (y < np.take(heights[side], idx, mode="clip"))

    t_f, idx_f, hit_f = plane(street.facade[side], strip.front_h)
    t_s = (np.take(strip.next_z[side], idx_f, mode="clip") - oz) / dz
    into = sign * (ox + t_s * dx) - np.float32(street.facade[side])
    y_s = oy + t_s * dy
    hit_s = (into >= 0) & (into <= np.float32(street.depth[side])) & (y_s >= 0)
    hit_s &= y_s < np.take(strip.next_h[side], idx_f, mode="clip")
    t_b, idx_b, hit_b = plane(street.backdrop[side], strip.back_h)
    kind = np.where(hit_f, np.uint8(2), np.where(hit_s, np.uint8(3), np.where(hit_b, np.uint8(4), np.uint8(0))))
    t = np.where(hit_f, t_f, np.where(hit_s, t_s, np.where(hit_b, t_b, np.float32(np.inf))))
    inst = np.where(hit_f, np.take(strip.front_id[side], idx_f, mode="clip"),
                    np.where(hit_s, np.take(strip.next_id[side], idx_f, mode="clip"),
                             np.take(strip.back_id[side], idx_b, mode="clip")))
    if strip.hedge_h[side].any():
        t_h, _, hit_h = plane(street.hedge[side], strip.hedge_h)
        kind[hit_h], t[hit_h], inst[hit_h] = 1, t_h[hit_h], 0
    y, z = oy + t * dy, oz + t * dz
    wall = kind == 3
    u = np.where(wall, sign * (ox + t * dx) - np.float32(street.facade[side]), z)
    face = -sign * np.float32(light[0])  # facades face the road; side walls face -z
    facing = np.where(wall, np.float32(-light[2]), face)
    return t, np.take(_SIDE_SURFACES, kind), u, y, inst, facing


def _part_windows(lo: np.ndarray, hi: np.ndarray, origin: np.ndarray, rot: np.ndarray,
                  intr: Intrinsics) -> np.ndarray:
    """(P, 4) pixel boxes (row0, row1, col0, col1) holding every pixel that world boxes lo..hi can cover.

    Boxes are clipped to the near plane before projection, so parts beside or partly behind the
    camera do not get the whole frame.
    """
    corners = lo[:, None] + _BOX_CORNERS * (hi - lo)[:, None]
    cam = to_camera(corners - origin, rot)  # (P, 8, 3)
    c0, c1 = cam[:, _BOX_EDGES[:, 0]], cam[:, _BOX_EDGES[:, 1]]  # (P, 12, 3) edge ends
    z0, z1 = c0[..., 2], c1[..., 2]
    crosses = (z0 - NEAR) * (z1 - NEAR) < 0
    s = np.where(crosses, (NEAR - z0) / np.where(crosses, z1 - z0, 1.0), 0.0)
    points = np.concatenate([cam, c0 + s[..., None] * (c1 - c0)], axis=1)  # (P, 20, 3)
    valid = np.concatenate([cam[..., 2] >= NEAR, crosses], axis=1)
    inv = intr.focal / np.maximum(points[..., 2], NEAR)
    xs, ys = intr.cx + points[..., 0] * inv, intr.cy - points[..., 1] * inv
    boxes = np.stack([np.where(valid, ys, np.inf).min(1), np.where(valid, ys, -np.inf).max(1),
                      np.where(valid, xs, np.inf).min(1), np.where(valid, xs, -np.inf).max(1)], -1)
    limits = np.array([intr.height, intr.height, intr.width, intr.width], float)
    boxes = np.nan_to_num(np.floor(boxes) + [0, 2, 0, 2], posinf=1e9, neginf=-1e9)
    return np.clip(boxes, 0, limits).astype(np.int64)


def _draw_bodies(bodies: Bodies, time: float, dt: float, origin: np.ndarray, rot: np.ndarray, shift: np.ndarray,
                 prev_rot: np.ndarray, dirs: np.ndarray, gb: GBuffer, intr: Intrinsics, light: np.ndarray) -> None:
    """Intersect every (part, pixel of its screen box) pair at once; the nearest hit per pixel wins.

    Each pair carries the ray origin relative to its part's anchor (`rel`, 3 rows) and the part's
    size parameters (`size`, 3 rows), repeated over the part's pixels; pairs are sorted by shape.
    """
    if len(bodies) == 0:
        return
    pos = bodies.positions(time)
    ahead = pos[:, 2] - origin[2]
    parts = np.flatnonzero(((ahead > -BODY_RANGE[0]) & (ahead < BODY_RANGE[1]))[bodies.part_body])
    part_pos = pos[bodies.part_body[parts]]
    box = _part_windows(part_pos + bodies.lo[parts], part_pos + bodies.hi[parts], origin, rot, intr)
    heights, widths = box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]
    areas = np.where((heights > 0) & (widths > 0), heights * widths, 0)
    keep = np.flatnonzero(areas)
    keep = keep[np.argsort(bodies.shape[parts[keep]], kind="stable")]  # contiguous runs per shape
    parts, part_pos, box, widths, areas = parts[keep], part_pos[keep], box[keep], widths[keep], areas[keep]
    n = int(areas.sum())
    if n == 0:
        return
    ends = np.cumsum(areas)
    rows, cols = np.divmod(np.arange(n) - np.repeat(ends - areas, areas), np.repeat(widths, areas))
    rows += np.repeat(box[:, 0], areas)
    cols += np.repeat(box[:, 2], areas)
    pix = rows * intr.width + cols
    d = np.take(dirs.reshape(3, -1), pix, axis=1)
    rel = np.repeat((origin - part_pos - bodies.a[parts]).T.astype(np.float32), areas, axis=1)
    size = np.repeat(bodies.b[parts].T, areas, axis=1)
    shapes = bodies.shape[parts]
    t, face = np.empty(n, np.float32), np.zeros(n, np.intp)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(shapes)) + 1])
    for first, last in zip(starts, [*starts[1:], len(shapes)], strict=True):
        sl = slice(ends[first] - areas[first], ends[last - 1])
        t[sl], face[sl] = _HITS[shapes[first]](rel[:, sl], d[:, sl], size[:, sl])
    depth = gb.depth.reshape(-1)
    closer = np.flatnonzero(t < depth[pix])
    if len(closer) == 0:
        return
    np.minimum.at(depth, pix[closer], t[closer])
    win = closer[t[closer] == depth[pix[closer]]]  # ascending, so still in runs of one shape
    part = np.repeat(parts, areas)[win]
    t, p, face = t[win], pix[win], face[win]
    d, rel, size = (np.take(x, win, axis=1) for x in (d, rel, size))
    # u, v in body coordinates: the hit point relative to the body origin
    u, v = _surface_coordinates(rel + np.take(bodies.a.T, part, axis=1) + t * d, face)
    normal_sign = np.take_along_axis(d, face[None] % 3, 0)[0] < 0  # box faces: is the normal +axis?
    facing = np.take(light, face % 3) * np.where(normal_sign, np.float32(1), np.float32(-1))
    curved = np.flatnonzero(bodies.shape[part] != Shape.BOX)
    if len(curved):
        hit = rel[:, curved] + t[curved] * d[:, curved]
        facing[curved] = _curved_facing(hit, size[:, curved], face[curved], bodies.shape[part[curved]], light)
    gb.surface.reshape(-1)[p] = bodies.surfaces[part, face % 3]
    gb.u.reshape(-1)[p], gb.v.reshape(-1)[p], gb.facing.reshape(-1)[p] = u, v, facing
    body = bodies.part_body[part]
    gb.inst.reshape(-1)[p] = bodies.inst[body]
    back = shift[:, None] - np.take(bodies.velocity.T.astype(np.float32) * np.float32(dt), body, axis=1)
    flow, prev_z = _reproject(t * d + back, prev_rot, intr, rows[win], cols[win])
    gb.flow[0].reshape(-1)[p], gb.flow[1].reshape(-1)[p] = flow
    gb.prev_z.reshape(-1)[p] = prev_z


# Primitives, in part coordinates: `rel` is the ray origin minus the part anchor, `size` the part's
# size parameters (box: edge lengths from the lo corner; cylinder: radius, height from the base
# centre; sphere: radius about the centre). Hit tests return the distance (inf on a miss) and a face
# code: box 0/1/2 = the x/y/z face; cylinder 0 = side, 4 = top cap (code % 3 == 1, the y face);
# sphere 3 (code % 3 == 0 selects the part's first surface).


def _box_hit(rel: np.ndarray, d: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / np.where(np.abs(d) < 1e-9, np.float32(1e-9), d)
    t0, t1 = -rel * inv, (size - rel) * inv
    near = np.minimum(t0, t1)
    t_near = near.max(0)
    t = np.where((t_near <= np.maximum(t0, t1).min(0)) & (t_near > 0), t_near, np.float32(np.inf))
    return t, near.argmax(0)  # the slab entered last is the face hit


def _cylinder_hit(rel: np.ndarray, d: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, h = size[0], size[1]
    px, py, pz = rel
    dx, dy, dz = d
    aa = np.maximum(dx * dx + dz * dz, 1e-12)
    bb = px * dx + pz * dz
    disc = bb * bb - aa * (px * px + pz * pz - r * r)
    t_side = (-bb - np.sqrt(np.maximum(disc, 0))) / aa
    y_side = py + t_side * dy
    t_side = np.where((disc >= 0) & (t_side > 0) & (y_side >= 0) & (y_side <= h), t_side, np.float32(np.inf))
    t_cap = (h - py) / np.where(dy < -1e-9, dy, np.float32(-1e-9))
    cx, cz = px + t_cap * dx, pz + t_cap * dz
    t_cap = np.where((py > h) & (cx * cx + cz * cz <= r * r), t_cap, np.float32(np.inf))
    cap = t_cap < t_side
    return np.where(cap, t_cap, t_side), np.where(cap, 4, 0)


def _sphere_hit(rel: np.ndarray, d: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bb = (rel * d).sum(0)
    disc = bb * bb - ((rel * rel).sum(0) - size[0] * size[0])
    t = -bb - np.sqrt(np.maximum(disc, 0))
    return np.where((disc >= 0) & (t > 0), t, np.float32(np.inf)), np.full(t.shape, 3)


def _surface_coordinates(q: np.ndarray, face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) of body-coordinate hit points: the two coordinates spanning the face; curved surfaces use
    height and a smooth horizontal coordinate (any function of the surface point keeps textures attached)."""
    u = np.where(face == 0, q[2], np.where(face == 3, (q[0] + q[2]) * 0.7, q[0]))
    v = np.where((face == 1) | (face == 4), q[2], q[1])
    return u, v


def _curved_facing(q: np.ndarray, size: np.ndarray, face: np.ndarray, shape: np.ndarray,
                   light: np.ndarray) -> np.ndarray:
    """Cosine to the light on cylinders (side normal horizontal, cap +y) and spheres (radial)."""
    radial = q[0] * light[0] + q[2] * light[2] + np.where(shape == Shape.SPHERE, q[1] * light[1], 0)
    return np.where(face == 4, light[1], radial / size[0])


# indexed by `Shape`
_HITS = (_box_hit, _cylinder_hit, _sphere_hit)
