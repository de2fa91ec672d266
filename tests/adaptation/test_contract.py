"""The method contract: every registered method goes through its lifecycle on a tiny model, called
exactly as ``adaptation.contract`` documents it and nothing else (no driver, no probing)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adaptation.contract import Method, MethodContext, Needs
from adaptation.methods import METHODS, method_class
from adaptation.trainer import LossOutput, make_optimizer
from models.accel import build_model
from models.config import get_config

from tests.adaptation.toy_stats import toy_source_stats

N, H, W = 2, 32, 64
SMALL = {"davsn": {"ndf": 8}, "i2vda": {"ndf": 8, "iter_launch": 0}, "uvda": {"ndf": 8, "threshold": 0.0,
                                                                           "video_discriminator": True},
         "stpl": {"dim": 16, "max_pixels": 64}}


def frames(gen: torch.Generator) -> torch.Tensor:
    return torch.rand(N, 3, H, W, generator=gen) * 255


def domain(extras: tuple[str, ...], labels: bool, gen: torch.Generator) -> dict[str, Any]:
    """A batch of one domain with the items ``adaptation.datasets.base`` documents for ``extras``."""
    flow = torch.zeros(N, 2, H, W)
    batch: dict[str, Any] = {"cur": frames(gen), "prev": frames(gen), "flow": flow}
    if labels:
        batch["label"] = torch.randint(0, 7, (N, H, W), generator=gen)
    if "prev2" in extras:
        batch.update(prev2=frames(gen), flow_prev=flow.clone())
    if "next" in extras:
        batch.update(next=frames(gen), flow_next=flow.clone())
    if "flow_fwd" in extras:
        batch["flow_fwd"] = flow.clone()
    return batch


def batch_for(needs: Needs | None, gen: torch.Generator, source_free: bool) -> dict[str, Any]:
    if needs is None:
        return domain((), labels=not source_free, gen=gen)
    return {"source": domain(needs.source, True, gen), "target": domain(needs.target, False, gen)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_lifecycle_on_a_tiny_model(name: str) -> None:
    from adaptation.sourcefree import SOURCE_FREE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(get_config("mini-os8"))
    model.source_stats = toy_source_stats(model)  # what srcstats reads (the others ignore it)
    method = method_class(name).create(MethodContext(seed=0, num_classes=7, total_steps=10), SMALL.get(name, {}))
    assert isinstance(method, Method) and method.name == name
    method.setup(model)
    groups = method.param_groups(model)
    assert groups and all(set(g) >= {"params", "lr_mult"} for g in groups)
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for g in groups for p in g["params"])  # only the model's own parameters
    aux = method.aux_param_groups()
    own_modules = {id(p) for m in method.modules().values() for p in m.parameters()}
    assert all(id(p) not in owned for g in aux for p in g["params"])  # the method's modules, not the model's
    opt = make_optimizer("sgd", groups, 1e-3, 0.9, 0.0)
    aux_opt = make_optimizer("adam", aux, 1e-3, 0.9, 0.0) if any(g["params"] for g in aux) else None
    if aux_opt is not None:
        for g in aux_opt.param_groups:
            g.update(method.aux_optimizer_options)
    method.train_mode(model)
    for step in range(2):
        out = method.loss(model, batch_for(method.needs, gen, name in SOURCE_FREE), step)
        assert isinstance(out, LossOutput) and torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if out.aux_loss is not None:
            assert aux_opt is not None
            aux_opt.zero_grad()
            out.aux_loss.backward()
            aux_opt.step()
        method.after_step(model, step)
    method.finish(model)
    state = method.state_dict()
    method.load_state_dict(state, model)
    assert own_modules <= {id(p) for m in method.modules().values() for p in m.parameters()}
    method.distribute(lambda module: module)  # the single-process wrapper


def test_setup_snapshots_the_model_as_it_is_when_training_starts() -> None:
    """The teacher and the anchor are copies of the model at ``setup``, not at construction."""
    torch.manual_seed(0)
    model = build_model(get_config("mini-os8"))
    method = method_class("selftrain").create(MethodContext(), {"anchor_weight": 0.5})
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    method.setup(model)
    teacher, anchor = method.guard.teacher, method.guard.anchor
    assert teacher is not None and anchor is not None
    first = next(model.parameters())
    assert torch.equal(next(teacher.parameters()), first) and torch.equal(next(anchor.parameters()), first)
    assert method.guard.cfg.ema_momentum == 0.99  # selftrain's default, the options only changed the anchor


def test_safeguard_options_become_one_injected_object() -> None:
    method = method_class("tent").create(MethodContext(seed=3), {"restore_p": 0.01, "diversity_weight": 0.5})
    assert method.guard.cfg.restore_p == 0.01 and method.guard.cfg.anchor_weight == 0.0
    assert method.diversity_weight == 0.5
    assert method_class("itcr").create(MethodContext(), {}).guard.cfg.anchor_weight == 0.1


def test_command_line_text_is_parsed_for_declared_kinds_only() -> None:
    from adaptation.contract import from_text

    declared = method_class("uvda").OPTIONS
    parsed = from_text(declared, {"video_discriminator": "TRUE", "ndf": "8", "threshold": "0.5",
                                  "refine": "consistency", "warmup": "soon", "unknown": "1"})
    assert parsed == {"video_discriminator": True, "ndf": 8, "threshold": 0.5, "refine": "consistency",
                      "warmup": "soon", "unknown": "1"}  # the last two are left for check_options to refuse
