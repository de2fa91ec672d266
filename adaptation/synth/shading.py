"""Texturing and lighting: turn a `GBuffer` into a linear, planar (3, H, W) RGB image.

Textures are functions of surface coordinates (metres on the surface, or the viewing direction for
the sky), so they move exactly with the flow. Noise comes from a tileable spectral noise bank with
pre-filtered levels, picked per pixel from the texel footprint, so that distant surfaces do not alias;
the bank is one fixed draw shared by all clips, which differ by per-surface offsets into it. Each
surface is shaded in one vectorised pass over its own pixels with its material's scalars.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from .raycast import GBuffer
from .styles import Lighting, Material

NOISE_SEED = 20240917


@dataclass(frozen=True)
class Textures:
    """Everything a clip needs to texture its surfaces: materials plus per-clip random draws."""

    materials: tuple[Material, ...]
    offsets: np.ndarray  # (n_surfaces, 2) noise offsets in texels, decorrelating surfaces
    atlas: np.ndarray  # noise levels laid out for lookups, see `noise_bank` and `noise_atlas`
    tints: np.ndarray  # (256, 3) per-instance colour offsets, see `instance_tints`


def make_textures(materials: tuple[Material, ...], rng: np.random.Generator) -> Textures:
    """Per-clip texture draws: every surface reads the shared noise at its own random offset."""
    offsets = rng.uniform(0, 256, (len(materials), 2)).astype(np.float32)
    return Textures(materials, offsets, _shared_atlas(), instance_tints(rng))


@functools.cache
def _shared_atlas() -> np.ndarray:
    """The noise atlas all clips share (a fixed draw; clips differ by offsets), built on first use."""
    atlas = noise_atlas(noise_bank(np.random.default_rng(NOISE_SEED)))
    atlas.setflags(write=False)
    return atlas


def noise_bank(rng: np.random.Generator, size: int = 256, levels: int = 4, exponent: float = 0.8) -> np.ndarray:
    """(levels, size, size) float32 tileable noise, unit-ish amplitude; level l is low-passed to size / 2**(l+1)."""
    freq = np.fft.fftfreq(size) * size
    radius = np.hypot(freq[:, None], freq[None, :])
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) / (1.0 + radius) ** exponent
    bank = np.stack([np.fft.ifft2(spectrum * np.exp(-((radius / (size / 2 ** (lv + 1))) ** 2))).real
                     for lv in range(levels)])
    return (0.5 * bank / bank[0].std()).clip(-1.5, 1.5).astype(np.float32)


def instance_tints(rng: np.random.Generator) -> np.ndarray:
    """(256, 3) float32 per-instance colour offsets in [-1, 1]; instance 0 gets none."""
    tints = rng.uniform(-1, 1, (256, 3)).astype(np.float32)
    tints[0] = 0
    return tints


def noise_atlas(bank: np.ndarray) -> np.ndarray:
    """Levels of `bank` side by side, each with its first row and column repeated after its last, so
    that bilinear lookups wrap within a level: shape (n + 1, levels * (n + 1))."""
    levels, n, _ = bank.shape
    padded = np.concatenate([bank, bank[:, :, :1]], axis=2)
    padded = np.concatenate([padded, padded[:, :1]], axis=1)
    return np.ascontiguousarray(padded.transpose(1, 0, 2).reshape(n + 1, levels * (n + 1)))


def sample_noise(atlas: np.ndarray, level: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear, wrapping lookup of noise level `level` at texel coordinates (x, y) (1-D arrays)."""
    n = atlas.shape[0] - 1
    count = len(x)
    cols = 1024  # OpenCV maps must stay below 32767 columns
    shape = (-(-count // cols), cols)
    map_x, map_y = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    inv = np.float32(1.0 / n)
    map_x.reshape(-1)[:count] = x - np.floor(x * inv) * n + level * np.float32(n + 1)
    map_y.reshape(-1)[:count] = y - np.floor(y * inv) * n
    out = cv2.remap(atlas, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1)[:count]


def _cell_hash(cu: np.ndarray, cv: np.ndarray, inst: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per pattern cell."""
    h = cu.astype(np.int32) * np.int32(73856093) ^ cv.astype(np.int32) * np.int32(19349663)
    h = (h ^ inst.astype(np.int32) * np.int32(83492791)) * np.int32(668265263)
    return ((h >> 12) & 1023).astype(np.float32) / 1024.0


def _shade_surface(m: Material, offset: np.ndarray, tex: Textures, u: np.ndarray, v: np.ndarray,
                   depth: np.ndarray, inst: np.ndarray | None, irradiance: list[np.ndarray] | None,
                   focal: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Lit colour (3, n) and glow (3, n) or None of n pixels of one surface; `irradiance` per channel, or
    None for surfaces that ignore lighting."""
    tint = np.take(tex.tints.T, inst, axis=1) if inst is not None else None  # (3, n)
    mix = pattern = None
    du, dv = m.duty
    if (du > 0 and dv > 0) or (m.grid and (du > 0 or dv > 0)):
        su, sv = np.float32(1 / m.period[0]), np.float32(1 / m.period[1])
        if m.vary and tint is not None:
            stretch = 1.0 + np.float32(m.vary) * tint[0]
            su, sv = su * stretch, sv * stretch
        uu, vv = u * su + np.float32(m.offset[0]), v * sv + np.float32(m.offset[1])
        cu, cv = np.floor(uu), np.floor(vv)
        on_u, on_v = (uu - cu) < du, (vv - cv) < dv
        pattern = (on_u | on_v) if m.grid else (on_u & on_v)
        mix = pattern.astype(np.float32)
    if m.gradient:
        ramp = np.clip(v * np.float32(m.gradient), 0, 1)
        mix = ramp if mix is None else np.maximum(mix, ramp)
    gain = np.ones(len(u), np.float32)
    if m.noise:
        scale = np.float32(m.scale)
        footprint = depth * (scale / np.float32(focal))
        level = (footprint > 1.5).astype(np.float32) + (footprint > 3.0) + (footprint > 6.0)
        noise = sample_noise(tex.atlas, level, u * scale + offset[0], v * np.float32(m.scale * m.stretch) + offset[1])
        gain = 1.0 + np.float32(m.noise) * noise
    tint_amp = None
    if m.tint and tint is not None:
        tint_amp = np.float32(m.tint) if mix is None else np.float32(m.tint) * (1.0 - mix)
    colour = np.empty((3, len(u)), np.float32)
    for c in range(3):
        plane = m.base[c] * gain if mix is None else (m.base[c] + (m.alt[c] - m.base[c]) * mix) * gain
        if tint_amp is not None:
            plane += tint_amp * tint[c]
        if irradiance is not None:
            plane *= irradiance[c]
        colour[c] = plane
    glow = None
    if m.glow and pattern is not None:
        lit_cell = pattern & (_cell_hash(cu, cv, inst if inst is not None else np.zeros_like(cu)) < m.glow_p)
        glow = np.asarray(m.glow_rgb, np.float32)[:, None] * (np.float32(m.glow) * lit_cell)
    return colour, glow


def shade(gb: GBuffer, tex: Textures, light: Lighting, focal: float,
          extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Planar (3, ...) lit colour of every pixel of `gb` (any leading shape), and the planar light emitted
    by glowing pattern cells (None when nothing glows). Lit surfaces receive ambient + sun * max(cos, 0)
    plus `extra` (planar, e.g. `night_light`)."""
    shape = gb.surface.shape
    surface = gb.surface.reshape(-1)
    u, v, depth, inst, facing = (a.reshape(-1) for a in (gb.u, gb.v, gb.depth, gb.inst, gb.facing))
    extra = extra.reshape(3, -1) if extra is not None else None
    colour = np.empty((3, surface.size), np.float32)
    glow = None
    for k in np.flatnonzero(np.bincount(surface, minlength=len(tex.materials))):
        m = tex.materials[k]
        idx = np.flatnonzero(surface == np.uint8(k))
        inst_k = np.take(inst, idx) & 255 if (m.tint or m.vary or m.glow) else None
        irradiance = None
        if m.lit:
            sun = np.maximum(np.take(facing, idx), 0)
            irradiance = [np.float32(light.ambient[c]) + np.float32(light.sun[c]) * sun for c in range(3)]
            if extra is not None:
                irradiance = [irradiance[c] + np.take(extra[c], idx) for c in range(3)]
        colour_k, glow_k = _shade_surface(m, tex.offsets[k], tex, np.take(u, idx), np.take(v, idx),
                                          np.take(depth, idx), inst_k, irradiance, focal)
        for c in range(3):
            colour[c][idx] = colour_k[c]
        if glow_k is not None:
            glow = np.zeros_like(colour) if glow is None else glow
            for c in range(3):
                glow[c][idx] = glow_k[c]
    return colour.reshape((3, *shape)), (glow.reshape((3, *shape)) if glow is not None else None)


def night_light(points: np.ndarray, depth: np.ndarray, beam: np.ndarray, origin: np.ndarray,
                lamps: np.ndarray, light: Lighting) -> np.ndarray:
    """Planar (3, H, W) light of the ego headlights (`beam`: (H, W) angular profile) and nearby street lamps.

    `points`: planar (3, H, W) world positions of the pixels.
    """
    head = np.zeros(depth.shape, np.float32)
    if light.headlights:
        head = light.headlights * beam / (1.0 + (depth * np.float32(1 / 12.0)) ** 2)
    lamp = np.zeros(depth.shape, np.float32)
    if light.lamps and len(lamps):
        near = lamps[(lamps[:, 2] > origin[2] - 10.0) & (lamps[:, 2] < origin[2] + 60.0)].astype(np.float32)
        for pos in near:
            d2 = (points[0] - pos[0]) ** 2 + (points[1] - pos[1]) ** 2 + (points[2] - pos[2]) ** 2
            lamp += 1.0 / (1.0 + d2 * np.float32(1 / 30.0))
        lamp *= np.float32(light.lamps)
    head_rgb = (1.0, 0.97, 0.9)
    return np.stack([head * head_rgb[c] + lamp * light.lamp_rgb[c] for c in range(3)]).astype(np.float32)


def headlight_beam(rays: np.ndarray) -> np.ndarray:
    """(H, W) angular profile of the headlights from planar camera rays: wide, aimed slightly down."""
    x, y = rays[0] / rays[2], rays[1] / rays[2]
    return np.exp(-((x / 0.55) ** 2) - ((y + 0.1) / 0.18) ** 2).astype(np.float32)
