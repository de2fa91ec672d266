"""Domain signatures: same style close, different styles apart, stable definition."""

import numpy as np
import pytest

from adaptation.synth.generator import generate_clip
from models.signature import LENGTH, SignatureEma, clip_signature, distance, frame_signature, nearest

STYLES = ("source", "fog", "night", "noise-blur", "recolor")


@pytest.fixture(scope="module")
def signatures() -> dict[tuple[str, int], np.ndarray]:
    return {(style, seed): clip_signature(generate_clip(style, frames=3, size=(96, 192), seed=seed).frames)
            for style in STYLES for seed in (0, 1, 2)}


def test_frame_signature_shape_and_range() -> None:
    frame = generate_clip("source", frames=1, size=(64, 128), seed=3).frames[0]
    sig = frame_signature(frame)
    assert sig.shape == (LENGTH,) and sig.dtype == np.float32
    assert np.all(sig >= 0) and np.all(sig <= 1)
    with pytest.raises(ValueError):
        frame_signature(frame.astype(np.float32))


def test_each_clip_is_nearest_to_its_own_style(signatures) -> None:
    # reference signature per style from seeds 0 and 1; the seed-2 clip of every style must match its own
    refs = {style: np.mean([signatures[(style, 0)], signatures[(style, 1)]], axis=0) for style in STYLES}
    for style in STYLES:
        match = nearest(signatures[(style, 2)], refs)
        assert match is not None and match[0] == style, (style, match)


def test_distance_units_and_errors() -> None:
    a = np.zeros(LENGTH, np.float32)
    assert distance(a, a) == 0.0
    assert distance(a, a + 0.1, scale=np.full(LENGTH, 0.1)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        distance(a, a[:-1])
    assert nearest(a, {}) is None


def test_ema_moves_towards_new_frames() -> None:
    ema = SignatureEma(alpha=0.5)
    ema.update(np.zeros(LENGTH))
    v = ema.update(np.ones(LENGTH))
    assert ema.frames == 2 and np.allclose(v, 0.5)
