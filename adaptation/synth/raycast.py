"""Per-pixel ray casting: which surface each pixel shows, where on it, and its exact backward flow.

A frame is cast in two passes. The background (ground bands, hedges, building rows, side walls, sky)
is intersected analytically for every pixel through the `Strip` tables. The parts of bodies (trees,
cars, persons) are then intersected, all at once, for every pixel of each part's screen-space box and
written where they are closer (a depth buffer, so occlusion is exact in both directions). Flow comes
from the hit point: static points are re-projected with the previous camera, body points after undoing
the body's motion, sky directions (at `SKY_DEPTH`) with the previous rotation only.

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
# ground bands across the street (left verge .. right verge), then 5 sky entries (band + 5 for rays into the sky)
_GROUND = np.array([Surface.VERGE, Surface.SIDEWALK, Surface.ROAD, Surface.SIDEWALK, Surface.VERGE] + [Surface.SKY] * 5,
                   np.uint8)
_SIDE_SURFACES = np.array([Surface.SKY, Surface.HEDGE, Surface.FACADE, Surface.SIDEWALL, Surface.BACKDROP], np.uint8)
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


def stack_gbuffers(buffers: list[GBuffer]) -> GBuffer:
    """Surface channels of several frames stacked on a new leading axis (for batched texturing)."""
    def stack(name: str) -> np.ndarray:
        return np.stack([getattr(gb, name) for gb in buffers])

    return GBuffer(stack("depth"), stack("surface"), stack("inst"), stack("u"), stack("v"), stack("facing"),
                   None, None)


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
    inv = np.float32(intr.focal) / np.maximum(cam[2], np.float32(NEAR))
    if rel.ndim == 3:
        h, w = rel.shape[1:]
        col0 = np.float32(col0) + np.arange(w, dtype=np.float32)[None, :]
        row0 = np.float32(row0) + np.arange(h, dtype=np.float32)[:, None]
    else:
        col0, row0 = col0.astype(np.float32), row0.astype(np.float32)
    flow = np.empty((2, *rel.shape[1:]), np.float32)
    flow[0] = (np.float32(intr.cx) - col0) + cam[0] * inv
    flow[1] = (np.float32(intr.cy) - row0) - cam[1] * inv
    return flow, cam[2]


def _background(scene: Scene, origin: np.ndarray, dirs: np.ndarray, light: np.ndarray) -> GBuffer:
    """Ground bands and sky for every pixel, then the side planes where a ray can reach them first.

    (`np.copyto(..., where=)` and arithmetic on masks stand in for `np.where`, which is several times
    slower per pixel.)
    """
    street = scene.street
    ox, oy, oz = (float(c) for c in origin)
    dx, dy, dz = dirs
    horizon = np.float32(oy / SKY_DEPTH)  # rays descending less steeply than this count as sky
    sky = -dy <= horizon
    depth = oy / np.maximum(-dy, horizon)
    u, v = ox + depth * dx, oz + depth * dz  # ground hit (x, z)
    edges = street.ground_edges
    band = (u >= edges[0]).view(np.uint8) + (u >= edges[1]) + (u >= edges[2]) + (u >= edges[3])
    surface = np.take(_GROUND, band + sky.view(np.uint8) * np.uint8(5))
    inner = np.minimum(street.hedge, street.facade)
    beyond = (u <= -inner[LEFT], u >= inner[RIGHT])
    np.copyto(u, dx / dz, where=sky)
    np.copyto(v, dy, where=sky)
    facing = np.float32(light[1]) + np.float32(1.0 - light[1]) * sky
    inst = np.zeros(depth.shape, np.int32)
    views = (depth, surface, u, v, inst, facing)
    for side in (LEFT, RIGHT):
        # Only rays that pass this side's nearest plane before reaching the ground need the plane tests.
        reach = ((dx < 0) if side == LEFT else (dx > 0)) & (beyond[side] | sky)
        rows = np.flatnonzero(reach.any(axis=1))
        if len(rows) == 0:
            continue
        cols = np.flatnonzero(reach.any(axis=0))
        block = (slice(0, rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        hits = _side_hits(scene, side, (ox, oy, oz), dirs[(slice(None), *block)], light)
        closer = hits[0] < depth[block]
        for dst, src in zip(views, hits, strict=True):
            np.copyto(dst[block], src, where=closer, casting="unsafe")
    return GBuffer(depth, surface, inst, u, v, facing, None, None)


def _side_hits(scene: Scene, side: int, origin: tuple[float, float, float], dirs: np.ndarray,
               light: np.ndarray) -> tuple[np.ndarray, ...]:
    """(t, surface, u, v, inst, facing) of the hedges, facades, side walls and second row on one side.

    Along a ray the planes of one side come in a fixed order (hedge, facade, side wall, second row),
    so the first one hit is the visible one; `t` is inf where none is hit.
    """
    street, strip = scene.street, scene.strip
    ox, oy, oz = origin
    dx, dy, dz = dirs
    sign = 1.0 if side == RIGHT else -1.0
    inv_dx = np.float32(sign) / np.maximum(dx * np.float32(sign), np.float32(1e-7))  # away from this side: hits nothing
    inv_res, z0 = np.float32(1.0 / strip.res), np.float32(strip.z0)

    def plane(dist: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tp = np.float32(sign * dist - ox) * inv_dx
        y, z = oy + tp * dy, oz + tp * dz
        return tp, y, ((z - z0) * inv_res).astype(np.int32)

    t_f, y_f, idx = plane(street.facade[side])
    front_h, next_z, next_h, front_id, next_id = np.moveaxis(
        np.take(strip.facade_rows[side], idx, axis=0, mode="clip")[..., :5], -1, 0)
    hit_f = (y_f >= 0) & (y_f < front_h)
    t_s = (next_z - oz) / dz
    into = np.float32(sign) * (ox + t_s * dx) - np.float32(street.facade[side])
    y_s = oy + t_s * dy
    hit_s = (into >= 0) & (into <= np.float32(street.depth[side])) & (y_s >= 0) & (y_s < next_h)
    t, y_b, idx = plane(street.backdrop[side])
    back_h, inst = np.moveaxis(np.take(strip.backdrop_rows[side], idx, axis=0, mode="clip"), -1, 0)
    hit_b = (y_b >= 0) & (y_b < back_h)
    # Write the candidates from the farthest to the nearest, so that the nearest hit stays.
    kind = hit_b.view(np.uint8) * np.uint8(4)
    inst = inst.copy()
    np.copyto(t, np.float32(np.inf), where=~hit_b)
    for t_c, k, ids, hit in ((t_s, 3, next_id, hit_s), (t_f, 2, front_id, hit_f)):
        np.copyto(t, t_c, where=hit)
        np.copyto(kind, k, where=hit)
        np.copyto(inst, ids, where=hit)
    if strip.hedge_h[side].any():
        t_h, y_h, idx = plane(street.hedge[side])
        hit_h = (y_h >= 0) & (y_h < np.take(strip.hedge_h[side], idx, mode="clip"))
        np.copyto(t, t_h, where=hit_h)
        np.copyto(kind, 1, where=hit_h)
        np.copyto(inst, 0, where=hit_h)
    u, y = oz + t * dz, oy + t * dy  # planes: (z, y); side walls: (depth into the block, y)
    wall = kind == 3
    np.copyto(u, np.float32(sign) * (ox + t * dx) - np.float32(street.facade[side]), where=wall)
    face = np.float32(-sign * light[0])  # facades face the road, side walls face -z
    facing = face + np.float32(-light[2] - face) * wall
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


def _sphere_windows(centres: np.ndarray, radius: np.ndarray, box: np.ndarray, intr: Intrinsics) -> np.ndarray:
    """Pixel boxes of spheres (camera-frame centres) from their tangent planes through the camera's
    vertical and horizontal axes, intersected with `box`; spheres reaching behind the camera keep `box`."""
    cz2 = centres[:, 2] ** 2 - radius**2
    ok = centres[:, 2] > radius + NEAR
    out = box.copy()
    for axis, (lo, hi) in ((0, (2, 3)), (1, (0, 1))):
        c = centres[:, axis]
        root = radius * np.sqrt(np.maximum(c * c + cz2, 0))
        k0, k1 = (c * centres[:, 2] - root) / np.where(ok, cz2, 1), (c * centres[:, 2] + root) / np.where(ok, cz2, 1)
        if axis == 0:
            first, last = intr.cx + intr.focal * k0, intr.cx + intr.focal * k1
        else:  # image y grows downwards
            first, last = intr.cy - intr.focal * k1, intr.cy - intr.focal * k0
        limit = intr.width if axis == 0 else intr.height
        out[ok, lo] = np.maximum(box[ok, lo], np.clip(np.floor(first[ok]), 0, limit))
        out[ok, hi] = np.minimum(box[ok, hi], np.clip(np.floor(last[ok]) + 2, 0, limit))
    return out


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
    spheres = np.flatnonzero(bodies.shape[parts] == Shape.SPHERE)
    if len(spheres):  # a sphere's own outline is much tighter than that of its bounding box
        centres = to_camera(part_pos[spheres] + bodies.a[parts[spheres]] - origin, rot)
        box[spheres] = _sphere_windows(centres, bodies.b[parts[spheres], 0], box[spheres], intr)
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
    axis = face % 3
    outward = np.float32(1) - np.float32(2) * (np.take_along_axis(d, axis[None], 0)[0] > 0)  # box normal: -sign(d)
    facing = np.take(light, axis) * outward
    curved = np.flatnonzero(bodies.shape[part] != Shape.BOX)
    if len(curved):
        hit = np.take(rel, curved, axis=1) + t[curved] * np.take(d, curved, axis=1)
        facing[curved] = _curved_facing(hit, size[0, curved], face[curved], light)
    gb.surface.reshape(-1)[p] = bodies.surfaces[part, axis]
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
# code whose remainder modulo 3 selects the part's surface: box 0/1/2 = the x/y/z face; sphere 3;
# cylinder 6 = side, 4 = top cap.


def _box_hit(rel: np.ndarray, d: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / d  # +-inf for rays parallel to a slab: the slab test below still holds
    t0, t1 = -rel * inv, (size - rel) * inv
    near = np.minimum(t0, t1)
    t = near.max(0)
    np.copyto(t, np.float32(np.inf), where=(t > np.maximum(t0, t1).min(0)) | (t <= 0))
    return t, near.argmax(0)  # the slab entered last is the face hit


def _cylinder_hit(rel: np.ndarray, d: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, h = size[0], size[1]
    px, py, pz = rel
    dx, dy, dz = d
    aa = np.maximum(dx * dx + dz * dz, 1e-12)
    bb = px * dx + pz * dz
    disc = bb * bb - aa * (px * px + pz * pz - r * r)
    t = (-bb - np.sqrt(np.maximum(disc, 0))) / aa
    y_side = py + t * dy
    np.copyto(t, np.float32(np.inf), where=(disc < 0) | (t <= 0) | (y_side < 0) | (y_side > h))
    t_cap = (h - py) / np.minimum(dy, np.float32(-1e-9))  # only rays going down see the top
    cx, cz = px + t_cap * dx, pz + t_cap * dz
    cap = (py > h) & (cx * cx + cz * cz <= r * r) & (t_cap < t)
    np.copyto(t, t_cap, where=cap)
    return t, 6 - 2 * cap.astype(np.intp)


def _sphere_hit(rel: np.ndarray, d: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bb = rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]
    disc = bb * bb - (rel[0] * rel[0] + rel[1] * rel[1] + rel[2] * rel[2] - size[0] * size[0])
    t = -bb - np.sqrt(np.maximum(disc, 0))
    np.copyto(t, np.float32(np.inf), where=(disc < 0) | (t <= 0))
    return t, np.full(t.shape, 3)


def _surface_coordinates(q: np.ndarray, face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) of body-coordinate hit points: the two coordinates spanning a flat face; curved sides use
    height and a smooth horizontal coordinate (any function of the surface point keeps textures attached)."""
    u = np.where(face == 0, q[2], np.where(face % 3 == 0, (q[0] + q[2]) * 0.7, q[0]))
    v = np.where((face == 1) | (face == 4), q[2], q[1])
    return u, v


def _curved_facing(q: np.ndarray, radius: np.ndarray, face: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Cosine to the light on spheres (radial normal; face 3), cylinder sides (horizontal normal; face 6)
    and cylinder caps (+y; face 4), from part-coordinate hit points."""
    radial = (q[0] * light[0] + q[2] * light[2] + (face == 3) * q[1] * light[1]) / radius
    return np.where(face == 4, np.float32(light[1]), radial)


# indexed by `Shape`
_HITS = (_box_hit, _cylinder_hit, _sphere_hit)
