"""Each source-free method trains exactly what it declares, with its stated BatchNorm policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptation.clips import PairSampler, TargetClip, class_balanced_weights, split_heldout
from adaptation.ema import ema_update, frozen_copy, stochastic_restore
from adaptation.contract import Method, SourceFreeMethod, UDAMethod
from adaptation.methods import METHODS, build_method, method_class
from adaptation.options import OptionError
from adaptation.methods.bn import bn_layers, recalibrate_bn
from adaptation.methods.stpl_heads import FUSIONS, STPLHeads
from adaptation.trainer import TrainConfig, train
from models.accel import build_model
from models.config import get_config

from tests.adaptation.toy_stats import toy_source_stats

SIZE = (64, 128)
# method -> does it change BN running statistics?
BN_POLICY = {"bn": True, "tent": True, "itcr": False, "stpl": False, "selftrain": False, "srcstats": False,
             "cotta": False}


def make_clip(seed: int, frames: int = 4, labels: bool = False) -> TargetClip:
    """Smooth random frames drifting right by 2 px per frame, with the matching backward flow."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    base = rng.random((h // 8, (w + 2 * frames) // 8 + 1, 3)) * 255
    big = np.kron(base, np.ones((8, 8, 1)))
    imgs = np.stack([big[:, 2 * (frames - t): 2 * (frames - t) + w] for t in range(frames)]).astype(np.uint8)
    flows = np.zeros((frames, h, w, 2), np.float32)
    flows[1:, :, :, 0] = 2.0  # pixel x of t was at x + 2 in t-1
    lab = (imgs[..., 0] > 127).astype(np.uint8) if labels else None
    return TargetClip(imgs, flows, lab)


@pytest.fixture(scope="module")
def clips() -> list[TargetClip]:
    return [make_clip(s) for s in range(3)]


def fresh_model(seed: int = 0) -> torch.nn.Module:
    """A random model that carries source statistics (as the demo model does; srcstats needs them)."""
    torch.manual_seed(seed)
    model = build_model(get_config("mini-os8"))
    model.source_stats = toy_source_stats(model)
    return model


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n}
    return params, stats


@pytest.mark.parametrize("name", sorted(BN_POLICY))
def test_one_step_changes_only_declared_parameters(name, clips):
    torch.set_num_threads(1)
    model = fresh_model()
    method = build_method(name, seed=0)
    declared = {id(p) for g in method.param_groups(model) if g.get("lr_mult", 1.0) > 0 for p in g["params"]}
    params0, stats0 = snapshot(model)
    sampler = PairSampler(clips, batch_size=2, seed=0)
    train(model, method, sampler, TrainConfig(steps=1, lr=1e-2, log_every=1))
    method.finish(model)
    names = dict(model.named_parameters())
    changed = {n for n, p in names.items() if not torch.equal(p.detach(), params0[n])}
    undeclared = {n for n in changed if id(names[n]) not in declared}
    assert not undeclared, f"{name} changed parameters it does not declare: {sorted(undeclared)[:5]}"
    if name != "bn":
        assert changed, f"{name} changed no parameter in one step"
    stats_changed = any(not torch.equal(b, stats0[n]) for n, b in model.named_buffers() if n in stats0)
    assert stats_changed == BN_POLICY[name], f"{name}: BN statistics changed={stats_changed}"


def test_methods_registered():
    """Every registered name builds its method (the registry points at real classes with that name),
    the source-free ones are exactly the driver's, and a bad name or option is refused by name."""
    from adaptation.sourcefree import SOURCE_FREE

    for name in METHODS:
        cls = method_class(name)
        assert cls.name == name and issubclass(cls, Method)
        assert issubclass(cls, SourceFreeMethod) == (name in SOURCE_FREE and name != "bn")  # bn trains nothing
        assert issubclass(cls, UDAMethod) == (name in ("davsn", "tps", "i2vda", "uvda"))
    assert set(BN_POLICY) == set(SOURCE_FREE)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(OptionError, match="option 'lr': is not an option of tent"):
        build_method("tent", lr=0.1)
    with pytest.raises(OptionError, match="option 'ema_momentum': must be a number in"):
        build_method("stpl", ema_momentum=2.0)


def test_tent_declares_only_bn_affine():
    model = fresh_model()
    method = build_method("tent")
    declared = {id(p) for g in method.param_groups(model) for p in g["params"]}
    bn_params = {id(p) for m in bn_layers(model) for p in m.parameters()}
    assert declared == bn_params


def test_bn_method_restores_momentum_and_matches_prepass(clips):
    model = fresh_model()
    method = build_method("bn")
    train(model, method, PairSampler(clips, batch_size=2, seed=0), TrainConfig(steps=2, lr=0.0))
    method.finish(model)
    assert all(m.momentum == 0.1 for m in bn_layers(model))
    other = fresh_model()
    n = recalibrate_bn(other, [torch.rand(2, 3, *SIZE) * 255])
    assert n == 1 and all(m.momentum == 0.1 for m in bn_layers(other)) and not other.training


@pytest.mark.parametrize("variant,fusion", [("spatio-temporal", f) for f in ("concat", "conv1x1", "add")]
                         + [("spatial", "stam"), ("temporal", "stam")])
def test_stpl_variants_and_fusions_train_heads_not_model_buffers(variant, fusion, clips):
    torch.set_num_threads(1)
    model = fresh_model()
    method = build_method("stpl", variant=variant, fusion=fusion, ce_weight=0.5, seed=1)
    _, stats0 = snapshot(model)
    train(model, method, PairSampler(clips, batch_size=2, seed=1), TrainConfig(steps=1, lr=1e-3))
    heads = method.heads
    assert isinstance(heads, STPLHeads) and heads.fusion.kind == (fusion if variant == "spatio-temporal" else "none")
    assert not any(n.startswith("heads") for n, _ in model.named_parameters())  # heads never join the model
    assert all(torch.equal(b, stats0[n]) for n, b in model.named_buffers() if n in stats0)


def test_stpl_heads_shapes():
    for kind in FUSIONS:
        heads = STPLHeads(kind, 8, dim=16)
        z = heads(torch.randn(2, 8, 5, 7), torch.randn(2, 8, 5, 7))
        assert z.shape == (2, 16, 5, 7)


@pytest.mark.parametrize("strategy", ["consistency", "max-confidence", "warp-frame"])
def test_selftrain_strategies_run(strategy, clips):
    model = fresh_model()
    method = build_method("selftrain", strategy=strategy, anchor_weight=0.1, restore_p=0.01)
    res = train(model, method, PairSampler(clips, batch_size=1, seed=2), TrainConfig(steps=1, lr=1e-3))
    assert res.steps == 1 and np.isfinite(res.history[-1]["loss"])


def test_ema_and_restore_helpers():
    student = torch.nn.Linear(3, 2)
    teacher = frozen_copy(student)
    with torch.no_grad():
        student.weight.add_(1.0)
    before = teacher.weight.clone()
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, 0.9 * before + 0.1 * student.weight)
    source = {n: p.detach().clone() - 5.0 for n, p in student.named_parameters()}
    assert stochastic_restore(student, source, 1.0) == 8  # p = 1: every element back to source
    assert torch.equal(student.weight, source["weight"])
    assert stochastic_restore(student, source, 0.0) == 0


def test_sampler_class_balanced_and_heldout_split():
    clip = make_clip(0, frames=10, labels=True)
    train_part, held = split_heldout([clip], 0.25, chunk=16)
    assert len(train_part[0]) + len(held[0]) == 10 and len(held[0]) >= 2
    pieces = [make_clip(s, frames=4) for s in range(8)]
    train_part, held = split_heldout(pieces, 0.25, chunk=16)
    assert len(held) == 2 and len(train_part) == 6
    hist = np.array([[100, 0], [100, 0], [100, 1]])
    w = class_balanced_weights(hist)
    assert w[2] > 3 * w[0] and w[2] > 0.5  # the only pair showing the rare class gets its whole share
    sampler = PairSampler([clip], batch_size=3, sampling="random", crop=(32, 64), flip=True, seed=0)
    b = sampler.batch()
    assert b["cur"].shape == (3, 3, 32, 64) and b["flow"].shape == (3, 2, 32, 64) and b["label"].shape == (3, 32, 64)
    assert set(b["flow"][:, 0].unique().tolist()) <= {2.0, -2.0}
    with pytest.raises(ValueError, match="one weight per pair"):
        PairSampler([clip], sampling="class-balanced")
