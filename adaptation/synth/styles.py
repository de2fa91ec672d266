"""Domains of the synthetic benchmark: materials (palette + texture), layout, lighting and optics.

`source` is the training domain. `fog`, `night` and `noise-blur` keep its materials; `recolor` swaps
palettes and textures between classes so that, e.g., its road looks like the source sidewalk and its
buildings like source vegetation. `recolor`, `night` and `noise-blur` also change the layout (object
sizes and densities), so that re-estimating normalisation statistics cannot undo the shift.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .core import N_SURFACES, Surface

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Material:
    """Albedo of one surface: `base`, switched to `alt` inside a periodic pattern, times procedural noise.

    The pattern is evaluated on surface coordinates (u, v) in metres: cells of `period`, "on" where the
    fractional cell position is below `duty` in u AND v (blocks: windows, dashes) or in u OR v when `grid`
    (lines: paving). `gradient` blends towards `alt` with v (the sky). `tint` adds a per-instance colour,
    `vary` a per-instance change of period. `glow` makes a fraction `glow_p` of pattern cells emit
    `glow_rgb` (lit windows, car lights). `lit=False` surfaces ignore lighting (the sky).
    """

    base: RGB
    alt: RGB = (0.0, 0.0, 0.0)
    noise: float = 0.1
    scale: float = 4.0  # noise texels per metre
    stretch: float = 1.0  # extra factor on the v frequency of the noise
    period: tuple[float, float] = (1.0, 1.0)
    duty: tuple[float, float] = (0.0, 0.0)
    offset: tuple[float, float] = (0.0, 0.0)
    grid: bool = False
    gradient: float = 0.0
    tint: float = 0.0
    vary: float = 0.0
    glow: float = 0.0
    glow_p: float = 0.0
    glow_rgb: RGB = (1.0, 1.0, 1.0)
    lit: bool = True


@dataclass(frozen=True)
class Layout:
    """Scene statistics; densities and scales are multipliers of the source values."""

    car_density: float = 1.0
    person_density: float = 1.0
    tree_density: float = 1.0
    car_scale: float = 1.0
    person_scale: float = 1.0
    building_height: tuple[float, float] = (7.0, 22.0)  # metres; above the camera (roofs are not modelled)
    gap_prob: float = 0.35
    parking_prob: float = 0.5
    hedge_prob: float = 0.5
    ego_speed: tuple[float, float] = (5.0, 12.0)  # metres per second

    def __post_init__(self) -> None:
        if self.building_height[0] < 2.0:
            raise ValueError(f"buildings must be taller than the camera (>= 2 m), got {self.building_height}")


@dataclass(frozen=True)
class Lighting:
    sun_dir: tuple[float, float, float] = (-0.5, 0.75, 0.35)  # towards the sun, normalised on use
    sun: RGB = (0.55, 0.53, 0.48)
    ambient: RGB = (0.62, 0.62, 0.66)
    headlights: float = 0.0  # strength of the ego car's headlight beam
    lamps: float = 0.0  # strength of the street lamps
    lamp_rgb: RGB = (1.0, 0.72, 0.4)


@dataclass(frozen=True)
class Optics:
    """Atmosphere and sensor, applied to the rendered image (see `photometric`)."""

    fog_density: float = 0.0  # per metre
    fog_rgb: RGB = (0.78, 0.8, 0.83)
    contrast: float = 1.0
    saturation: float = 1.0
    gain: float = 1.0
    gamma: float = 1.0
    cast: RGB = (1.0, 1.0, 1.0)
    noise: float = 0.0  # Gaussian read noise sigma (image in [0, 1])
    shot: float = 0.0  # signal-dependent noise: sigma = shot * sqrt(value)
    motion_blur: float = 0.0  # exposure as a fraction of the frame interval (blur along the exact flow)
    defocus: float = 0.0  # Gaussian sigma in pixels at 512 px width
    lamp_glow: float = 0.0  # halo strength around street-lamp heads


@dataclass(frozen=True)
class Style:
    name: str
    materials: tuple[Material, ...]  # indexed by `Surface`
    layout: Layout = field(default_factory=Layout)
    lighting: Lighting = field(default_factory=Lighting)
    optics: Optics = field(default_factory=Optics)

    def __post_init__(self) -> None:
        if len(self.materials) != N_SURFACES:
            raise ValueError(f"style {self.name!r} needs {N_SURFACES} materials, got {len(self.materials)}")


def _materials(table: dict[Surface, Material]) -> tuple[Material, ...]:
    missing = [s.name for s in Surface if s not in table]
    if missing:
        raise ValueError(f"materials missing for {missing}")
    return tuple(table[s] for s in Surface)


def _override(materials: tuple[Material, ...], changes: dict[Surface, Material]) -> tuple[Material, ...]:
    return tuple(changes.get(s, m) for s, m in zip(Surface, materials, strict=True))


# --- source: clean daylight -----------------------------------------------------------------------------
_ASPHALT = Material((0.34, 0.34, 0.36), (0.88, 0.88, 0.84), noise=0.18, scale=12.0, period=(3.5, 9.0),
                    duty=(0.15 / 3.5, 0.4), offset=(0.075 / 3.5, 0.0))
_PAVING = Material((0.64, 0.6, 0.56), (0.45, 0.42, 0.4), noise=0.12, scale=10.0, period=(0.75, 0.75),
                   duty=(0.06, 0.06), grid=True)
_PLASTER = Material((0.62, 0.52, 0.44), (0.18, 0.22, 0.27), noise=0.1, scale=4.0, period=(3.2, 3.1),
                    duty=(0.45, 0.5), offset=(0.0, -0.25), tint=0.14, vary=0.25)
_LEAVES = Material((0.22, 0.4, 0.13), noise=0.45, scale=7.0, tint=0.06)
_PAINT = Material((0.5, 0.5, 0.52), noise=0.04, scale=2.0, tint=0.38)
_GLASS = Material((0.14, 0.17, 0.22), noise=0.15, scale=3.0)
_CLOTHES = Material((0.4, 0.32, 0.36), (0.16, 0.18, 0.3), noise=0.1, scale=6.0, period=(1.0, 100.0),
                    duty=(1.0, 0.008), tint=0.3)

SOURCE_MATERIALS = _materials({
    Surface.SKY: Material((0.8, 0.86, 0.93), (0.36, 0.56, 0.86), noise=0.12, scale=40.0, stretch=3.0,
                          gradient=2.5, lit=False),
    Surface.ROAD: _ASPHALT,
    Surface.SIDEWALK: _PAVING,
    Surface.VERGE: Material((0.3, 0.46, 0.17), noise=0.35, scale=8.0),
    Surface.FACADE: _PLASTER,
    Surface.SIDEWALL: replace(_PLASTER, duty=(0.0, 0.0)),
    Surface.BACKDROP: Material((0.68, 0.64, 0.62), (0.3, 0.33, 0.38), noise=0.08, period=(2.6, 2.8),
                               duty=(0.4, 0.45), tint=0.1, vary=0.2),
    Surface.HEDGE: Material((0.2, 0.36, 0.12), noise=0.4, scale=10.0),
    Surface.CROWN: _LEAVES,
    Surface.TRUNK: Material((0.36, 0.26, 0.17), noise=0.25, scale=10.0, stretch=0.15),
    Surface.CAR_SIDE: replace(_PAINT, alt=(0.06, 0.06, 0.06), period=(1.0, 100.0), duty=(1.0, 0.0035)),
    Surface.CAR_END: replace(_PAINT, alt=(0.75, 0.12, 0.1), period=(1.4, 100.0), duty=(0.2, 0.002),
                             offset=(0.6, -0.006)),
    Surface.CAR_TOP: _PAINT,
    Surface.CAR_GLASS: _GLASS,
    Surface.PERSON: _CLOTHES,
    Surface.HEAD: Material((0.78, 0.6, 0.48), noise=0.05, tint=0.08),
})

# --- recolor: some classes borrow the look of other source classes ---------------------------------------
# Road and sidewalk swap palettes and textures, and buildings take the green and leafy noise of source
# vegetation (keeping their windows). Vegetation turns autumn brown, persons wear car paint and cars
# clothing colours; the sky only pales. Objects are larger and denser (see the layout below).
_AUTUMN = replace(_LEAVES, base=(0.55, 0.42, 0.3), tint=0.1)
_RECOLOR_BUILDING = replace(_PLASTER, base=(0.3, 0.44, 0.19), alt=(0.1, 0.17, 0.07), noise=0.35, scale=7.0,
                            tint=0.05)
RECOLOR_MATERIALS = _materials({
    Surface.SKY: Material((0.86, 0.86, 0.86), (0.55, 0.66, 0.85), noise=0.08, scale=40.0, stretch=3.0,
                          gradient=2.0, lit=False),
    Surface.ROAD: replace(_PAVING, period=(0.9, 0.9)),
    Surface.SIDEWALK: replace(_ASPHALT, period=(7.0, 6.0), duty=(0.02, 0.5)),
    Surface.VERGE: replace(_AUTUMN, base=(0.5, 0.45, 0.3), scale=8.0),
    Surface.FACADE: _RECOLOR_BUILDING,
    Surface.SIDEWALL: replace(_RECOLOR_BUILDING, duty=(0.0, 0.0)),
    Surface.BACKDROP: replace(_RECOLOR_BUILDING, base=(0.34, 0.48, 0.24), period=(2.6, 2.8)),
    Surface.HEDGE: replace(_AUTUMN, scale=10.0),
    Surface.CROWN: _AUTUMN,
    Surface.TRUNK: replace(SOURCE_MATERIALS[Surface.TRUNK], base=(0.25, 0.22, 0.2)),
    Surface.CAR_SIDE: replace(_CLOTHES, duty=(1.0, 0.0035), alt=(0.06, 0.06, 0.06)),
    Surface.CAR_END: replace(_CLOTHES, duty=(0.0, 0.0)),
    Surface.CAR_TOP: replace(_CLOTHES, duty=(0.0, 0.0)),
    Surface.CAR_GLASS: _GLASS,
    Surface.PERSON: replace(_PAINT, noise=0.06),
    Surface.HEAD: SOURCE_MATERIALS[Surface.HEAD],
})

# --- night: source materials, artificial light, glowing windows and car lights ----------------------------
NIGHT_MATERIALS = _override(SOURCE_MATERIALS, {
    Surface.SKY: Material((0.07, 0.08, 0.13), (0.01, 0.01, 0.03), noise=0.1, scale=40.0, stretch=3.0,
                          gradient=3.0, lit=False),
    Surface.FACADE: replace(_PLASTER, glow=1.4, glow_p=0.3, glow_rgb=(1.0, 0.8, 0.45)),
    Surface.BACKDROP: replace(SOURCE_MATERIALS[Surface.BACKDROP], glow=1.1, glow_p=0.25, glow_rgb=(1.0, 0.85, 0.5)),
    Surface.CAR_END: replace(SOURCE_MATERIALS[Surface.CAR_END], glow=1.6, glow_p=1.0, glow_rgb=(1.0, 0.3, 0.15)),
})

STYLES: dict[str, Style] = {
    "source": Style("source", SOURCE_MATERIALS),
    "fog": Style(
        "fog", SOURCE_MATERIALS,
        lighting=Lighting(sun=(0.2, 0.2, 0.2), ambient=(0.78, 0.78, 0.8)),
        optics=Optics(fog_density=0.035, contrast=0.75, saturation=0.6),
    ),
    "night": Style(
        "night", NIGHT_MATERIALS,
        layout=Layout(car_density=1.3, person_density=0.6, building_height=(10.0, 30.0), parking_prob=0.8),
        lighting=Lighting(sun=(0.0, 0.0, 0.0), ambient=(0.03, 0.035, 0.06), headlights=1.2, lamps=0.5),
        optics=Optics(noise=0.03, shot=0.03, gamma=0.9, cast=(1.05, 0.95, 1.1), lamp_glow=1.0),
    ),
    "noise-blur": Style(
        "noise-blur", SOURCE_MATERIALS,
        layout=Layout(car_density=1.6, person_density=2.5, person_scale=0.9, tree_density=1.3),
        optics=Optics(motion_blur=1.0, defocus=1.6, noise=0.07, shot=0.03),
    ),
    "recolor": Style(
        "recolor", RECOLOR_MATERIALS,
        layout=Layout(car_density=1.6, person_density=2.2, tree_density=1.8, car_scale=1.35, person_scale=1.2,
                      building_height=(5.0, 14.0), gap_prob=0.45, hedge_prob=0.8),
        lighting=Lighting(sun_dir=(0.5, 0.6, 0.4), sun=(0.6, 0.5, 0.4), ambient=(0.6, 0.58, 0.56)),
    ),
}


def list_styles() -> list[str]:
    """Style names, "source" first."""
    return ["source"] + [name for name in STYLES if name != "source"]
