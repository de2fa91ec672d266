"""Atmosphere and sensor effects as pure functions of planar float32 (3, H, W) RGB images in [0, 1].

Planar images keep every colour plane contiguous, which makes the per-pixel arithmetic several times
faster than on (H, W, 3); `to_uint8` returns the usual (H, W, 3) layout.
"""

from __future__ import annotations

import cv2
import numpy as np

RGB = tuple[float, float, float]
_LUMA = (0.299, 0.587, 0.114)


def _column(rgb: RGB) -> np.ndarray:
    return np.asarray(rgb, np.float32)[:, None, None]


def apply_fog(image: np.ndarray, depth: np.ndarray, density: float, colour: RGB) -> np.ndarray:
    """Exponential fog: transmittance exp(-density * depth) towards `colour`; `depth` is (H, W) metres."""
    keep = np.exp(-np.float32(density) * depth)
    fog = _column(colour)
    return fog + (image - fog) * keep


def motion_blur(image: np.ndarray, flow: np.ndarray, exposure: float, taps: int = 6) -> np.ndarray:
    """Average of the image along each pixel's backward motion: p + s * flow for s in [0, exposure].

    `flow`: planar (2, H, W) backward flow in pixels.
    """
    h, w = image.shape[1:]
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    interleaved = cv2.merge(list(image))  # OpenCV filters (H, W, 3) images in one pass
    out = np.zeros_like(interleaved)
    for s in np.linspace(0.0, exposure, taps, dtype=np.float32):
        out += cv2.remap(interleaved, xs + s * flow[0], ys + s * flow[1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    return np.stack(cv2.split(out)) * np.float32(1.0 / taps)


def defocus(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian defocus blur with `sigma` pixels."""
    if sigma <= 0:
        return image
    return np.stack(cv2.split(cv2.GaussianBlur(cv2.merge(list(image)), (0, 0), sigma)))


def tone(image: np.ndarray, contrast: float = 1.0, saturation: float = 1.0, gain: float = 1.0,
         gamma: float = 1.0, cast: RGB = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Contrast about the frame mean, saturation about luma, per-channel gain (`gain` * `cast`), gamma."""
    out = image
    if contrast != 1.0:
        mean = out.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)[:, None, None]
        out = mean + (out - mean) * np.float32(contrast)
    if saturation != 1.0:
        luma = _LUMA[0] * out[0] + _LUMA[1] * out[1] + _LUMA[2] * out[2]
        out = luma + (out - luma) * np.float32(saturation)
    scale = np.float32(gain) * np.asarray(cast, np.float32)
    if np.any(scale != 1.0):
        out = out * scale[:, None, None]
    if gamma != 1.0:
        out = np.maximum(out, 0) ** np.float32(gamma)
    return out


def add_glow(image: np.ndarray, points: np.ndarray, strength: float, colour: RGB, radius: float) -> np.ndarray:
    """Add a bright core and a halo of `radius` pixels around each (x, y) point (lamps, lens glare)."""
    h, w = image.shape[1:]
    pts = np.round(points).astype(np.int64).reshape(-1, 2)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    if not inside.any():
        return image
    impulses = np.zeros((h, w), np.float32)
    np.add.at(impulses, (pts[inside, 1], pts[inside, 0]), 1.0)
    core = max(radius / 6, 0.7)
    spots = cv2.GaussianBlur(impulses, (0, 0), core) * np.float32(2 * np.pi * core**2)
    spots += 0.35 * cv2.GaussianBlur(impulses, (0, 0), radius) * np.float32(2 * np.pi * radius**2)
    return image + np.float32(strength) * spots * _column(colour)


def sensor_noise(image: np.ndarray, rng: np.random.Generator, sigma: float, shot: float) -> np.ndarray:
    """Gaussian read noise `sigma` plus signal-dependent shot noise `shot * sqrt(value)`."""
    if sigma <= 0 and shot <= 0:
        return image
    std = np.sqrt(np.float32(sigma**2) + np.float32(shot**2) * np.maximum(image, 0))
    return image + std * rng.standard_normal(image.shape, dtype=np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clip to [0, 1], quantise, and return (H, W, 3) uint8."""
    planar = np.clip(image * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)
    return cv2.merge(list(planar))  # interleaves planes several times faster than a transposed copy
