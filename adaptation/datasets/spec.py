"""Dataset specs on the command line: ``NAME:PATH`` (real datasets) or ``synthetic:STYLE``.

    viper:/data/Viper   synthia-seq:/data/SynthiaSeq   cityscapes-seq:/data/Cityscapes   synthetic:fog
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from models.classes import CLASS_SETS

from .base import VideoFrameDataset

# Name -> "module:Class", written out by hand (no decorator registry).
DATASETS: dict[str, str] = {
    "viper": "adaptation.datasets.viper:Viper",
    "synthia-seq": "adaptation.datasets.synthia_seq:SynthiaSeq",
    "cityscapes-seq": "adaptation.datasets.cityscapes_seq:CityscapesSeq",
    "synthetic": "adaptation.datasets.synthetic:SyntheticVideos",
}
# The label space each labelled source defines (a Cityscapes-Seq target is mapped into it).
LABEL_SPACE = {"viper": "viper", "synthia-seq": "synthia", "synthetic": "synthetic", "cityscapes-seq": "cityscapes"}


@dataclass(frozen=True)
class DataSpec:
    name: str
    arg: str  # a path, or the style for synthetic data

    def __str__(self) -> str:
        return f"{self.name}:{self.arg}"

    @property
    def default_flow(self) -> str:
        return "gt" if self.name == "synthetic" else "precomputed"


def parse_spec(text: str) -> DataSpec:
    """``NAME:PATH`` or ``synthetic:STYLE`` -> DataSpec; a clear ValueError otherwise."""
    name, sep, arg = text.partition(":")
    name = name.strip().lower()
    if not sep or not arg:
        raise ValueError(f"bad dataset spec {text!r}: expected NAME:PATH or synthetic:STYLE "
                         f"with NAME one of {', '.join(DATASETS)}")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} in {text!r}; choose one of {', '.join(DATASETS)}")
    return DataSpec(name, arg)


def accepted_options(spec: DataSpec, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` the spec's dataset class takes (e.g. ``clips`` only for synthetic data)."""
    module, _, cls_name = DATASETS[spec.name].partition(":")
    params = inspect.signature(getattr(importlib.import_module(module), cls_name)).parameters
    return {k: v for k, v in options.items() if k in params}


def classes_of(spec: DataSpec) -> tuple[str, ...]:
    """The classes a labelled dataset of this kind defines (Cityscapes-Seq as a source: the 19 standard)."""
    return CLASS_SETS[LABEL_SPACE[spec.name]]


def label_space_of(classes: tuple[str, ...] | list[str]) -> str:
    """Name of the class set equal to ``classes`` (to map Cityscapes ids into a model's label space)."""
    for name, names in CLASS_SETS.items():
        if tuple(classes) == names:
            return name
    raise ValueError(f"no known label space has the classes {list(classes)}; known: {sorted(CLASS_SETS)}")


def build_dataset(spec: DataSpec | str, split: str, input_size: tuple[int, int], flow: str | None = None,
                  extras: tuple[str, ...] = (), labels: bool = True, native_labels: bool = False,
                  label_space: str | None = None, flow_dir: str | None = None,
                  **options: Any) -> VideoFrameDataset:
    """Instantiate the dataset a spec names. ``options`` go to the class (e.g. ``clips`` for synthetic)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    module, _, cls_name = DATASETS[spec.name].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    kw: dict[str, Any] = dict(split=split, input_size=input_size, flow=flow or spec.default_flow,
                              extras=tuple(extras), labels=labels, native_labels=native_labels, **options)
    if spec.name == "synthetic":
        if flow_dir is not None:
            raise ValueError("synthetic data has exact flow; --flow-dir does not apply")
        return cls(style=spec.arg, **kw)
    if spec.name == "cityscapes-seq":
        kw["label_space"] = label_space or LABEL_SPACE[spec.name]
    elif label_space is not None and label_space != LABEL_SPACE[spec.name]:
        raise ValueError(f"{spec.name} is labelled in the {LABEL_SPACE[spec.name]} label space, "
                         f"not {label_space}")
    return cls(spec.arg, flow_dir=flow_dir, **kw)
