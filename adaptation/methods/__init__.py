"""Method registry: CLI name -> "module:Class". Written out by hand; nothing is imported until used."""

from __future__ import annotations

import importlib
from typing import Any

from ..contract import Method, MethodContext

METHODS: dict[str, str] = {
    # supervised / offline UDA (vss train)
    "source-only": "adaptation.methods.supervised:SourceOnly",
    "davsn": "adaptation.methods.davsn:DAVSN",
    "tps": "adaptation.methods.tps:TPS",
    "i2vda": "adaptation.methods.i2vda:I2VDA",
    "uvda": "adaptation.methods.uvda:UnifiedVideoDA",
    # source-free (vss adapt, the adaptation worker)
    "bn": "adaptation.methods.bn:BNStats",
    "tent": "adaptation.methods.tent:Tent",
    "itcr": "adaptation.methods.itcr:ITCR",
    "stpl": "adaptation.methods.stpl:STPL",
    "selftrain": "adaptation.methods.selftrain:SelfTrain",
    "srcstats": "adaptation.methods.srcstats:SourceStatsMethod",
    "cotta": "adaptation.methods.cotta:CoTTA",
}


def method_class(name: str) -> type[Method]:
    """The class of a method by its CLI name (imports its module)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, *, seed: int = 0, num_classes: int | None = None, aux_head: bool = True,
                 total_steps: int = 50_000, **options: Any) -> Method:
    """Instantiate a method by its CLI name: the keywords above are the run's context
    (``MethodContext``), the rest are the method's declared ``OPTIONS`` (``OptionError`` otherwise)."""
    context = MethodContext(seed=seed, num_classes=num_classes, aux_head=aux_head, total_steps=total_steps)
    return method_class(name).create(context, options)
