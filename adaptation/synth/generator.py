"""`generate_clip`: a random street, an ego trajectory and a style, rendered into a `Clip`.

Frames are ray cast one by one (`raycast`), textured and lit in batches of frames (`shading`, whose
cost per call is mostly per surface, not per pixel), then passed through the style's optics one by one.
"""

from __future__ import annotations

import cv2
import numpy as np

from . import photometric as ph
from .camera import Intrinsics, Trajectory, camera_rays, ego_trajectory, project, to_camera
from .core import SURFACE_LABEL, Clip
from .raycast import GBuffer, render_gbuffer, stack_gbuffers, world_directions
from .scene import LANE, Scene, build_scene
from .shading import headlight_beam, make_textures, night_light, shade
from .styles import STYLES, Style, list_styles

MIN_SIZE = 32
BATCH_PIXELS = 1 << 18  # frames are textured together in batches of about this many pixels


def generate_clip(style: str = "source", frames: int = 16, size: tuple[int, int] = (256, 512),
                  seed: int = 0) -> Clip:
    """Render `frames` frames of size (H, W) of a random street in `style`; deterministic in `seed`.

    The camera path, the street layout, the textures and the sensor noise draw from separate streams
    of `seed`, so styles with the source layout (fog) show the same street as `source` for one seed.
    """
    spec = _check(style, frames, size, seed)
    scene, traj, texture_rng, sensor_rng = make_world(spec, frames, seed)
    frames_, labels, flow = render(scene, traj, spec, (int(size[0]), int(size[1])), texture_rng, sensor_rng)
    return Clip(frames_, labels, flow, style, int(seed))


def make_world(style: Style, frames: int, seed: int) -> tuple[Scene, Trajectory, np.random.Generator,
                                                               np.random.Generator]:
    """Scene, camera trajectory, and the texture and sensor random streams of one clip."""
    cam_rng, layout_rng, texture_rng, sensor_rng = (np.random.default_rng(s)
                                                    for s in np.random.SeedSequence(seed).spawn(4))
    layout = style.layout
    traj = ego_trajectory(cam_rng, frames, 0.5 * LANE, layout.ego_speed)
    scene = build_scene(layout_rng, layout, float(traj.origins[-1, 2]), (frames + 1) * traj.dt, layout.ego_speed)
    return scene, traj, texture_rng, sensor_rng


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check(style: str, frames: int, size: tuple[int, int], seed: int) -> Style:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; available: {', '.join(list_styles())}")
    if not _is_int(frames) or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
    if not isinstance(size, tuple | list) or len(size) != 2 or not all(_is_int(s) and s >= MIN_SIZE for s in size):
        raise ValueError(f"size must be (height, width) with integers >= {MIN_SIZE}, got {size!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return STYLES[style]


def render(scene: Scene, traj: Trajectory, style: Style, size: tuple[int, int], texture_rng: np.random.Generator,
           sensor_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8, labels (T, H, W) uint8 and backward flow (T, H, W, 2) float32."""
    intr = Intrinsics.for_size(*size)
    rays = np.ascontiguousarray(camera_rays(intr).transpose(2, 0, 1))
    sun = np.asarray(style.lighting.sun_dir, np.float64)
    sun = (sun / np.linalg.norm(sun)).astype(np.float32)
    textures = make_textures(style.materials, texture_rng)
    beam = headlight_beam(rays) if style.lighting.headlights else None
    n, (h, w) = traj.frames, size
    images = np.empty((n, h, w, 3), np.uint8)
    labels = np.empty((n, h, w), np.uint8)
    flow = np.zeros((n, h, w, 2), np.float32)
    batch = max(1, BATCH_PIXELS // (h * w))
    for start in range(0, n, batch):
        times = range(start, min(n, start + batch))
        buffers = [render_gbuffer(scene, traj, t, intr, rays, sun) for t in times]
        stacked = stack_gbuffers(buffers)
        extra = None
        if beam is not None or style.lighting.lamps:
            extra = np.stack([_night_light(gb, traj, t, rays, beam, scene, style) for t, gb in zip(times, buffers,
                                                                                                  strict=True)], 1)
        image, glow = shade(stacked, textures, style.lighting, intr.focal, extra)
        if glow is not None:
            image += glow
        for i, (t, gb) in enumerate(zip(times, buffers, strict=True)):
            labels[t] = np.take(SURFACE_LABEL, gb.surface)
            if t > 0:
                flow[t] = cv2.merge(list(gb.flow))
            images[t] = ph.to_uint8(_optics(image[:, i], gb, style, scene, *traj.pose(t), intr, sensor_rng))
    return images, labels, flow


def _night_light(gb: GBuffer, traj: Trajectory, t: int, rays: np.ndarray, beam: np.ndarray | None, scene: Scene,
                 style: Style) -> np.ndarray:
    origin, rot = traj.pose(t)
    points = gb.depth * world_directions(rays, rot) + origin.astype(np.float32)[:, None, None]
    return night_light(points, gb.depth, beam if beam is not None else 0.0, origin, scene.lamps, style.lighting)


def _optics(image: np.ndarray, gb: GBuffer, style: Style, scene: Scene, origin: np.ndarray, rot: np.ndarray,
            intr: Intrinsics, rng: np.random.Generator) -> np.ndarray:
    o, px = style.optics, intr.width / 512.0
    if o.fog_density:
        image = ph.apply_fog(image, gb.depth, o.fog_density, o.fog_rgb)
    if o.lamp_glow and len(scene.lamps):
        cam = to_camera(scene.lamps - origin, rot)
        points = np.stack(project(cam[cam[:, 2] > 1.0], intr), -1)
        image = ph.add_glow(image, points, o.lamp_glow, style.lighting.lamp_rgb, 10.0 * px)
    if o.motion_blur:
        image = ph.motion_blur(image, gb.flow, o.motion_blur)
    image = ph.defocus(image, o.defocus * px)
    image = ph.tone(image, o.contrast, o.saturation, o.gain, o.gamma, o.cast)
    return ph.sensor_noise(image, rng, o.noise, o.shot)
