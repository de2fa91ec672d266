"""CoTTA-style baseline: the student moves, the teacher is an EMA of it, restore resets a fraction to the
start, unsure teachers average augmented views, and the teacher is what a run publishes."""

from __future__ import annotations

import pytest
import torch

from adaptation.clips import PairSampler
from adaptation.losses import scaled_view, soft_cross_entropy, softmax_entropy, unview
from adaptation.methods import build_method
from adaptation.methods.cotta import teacher_probs, views
from adaptation.options import OptionError
from tests.adaptation.test_methods import fresh_model, make_clip


def one_step(model, method, lr: float = 1e-2):
    """setup, one loss + Adam step; returns (start params, student params before after_step)."""
    torch.set_num_threads(1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.setup(model)
    method.train_mode(model)
    opt = torch.optim.Adam([p for g in method.param_groups(model) for p in g["params"]], lr=lr)
    batch = next(iter(PairSampler([make_clip(s) for s in range(2)], batch_size=2, seed=0)))
    out = method.loss(model, batch, 0)
    assert torch.isfinite(out.loss)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    student = {n: p.detach().clone() for n, p in model.named_parameters()}
    return start, student


def test_a_step_moves_the_student_and_the_teacher_is_its_ema():
    model = fresh_model()
    method = build_method("cotta", seed=0, ema_momentum=0.9, restore_p=0.0, publish="student")
    start, student = one_step(model, method)
    moved = sum(int((student[n] != start[n]).sum()) for n in start)
    assert moved > 0.5 * sum(p.numel() for p in start.values()), "one Adam step should move most weights"
    method.after_step(model, 0)
    teacher = dict(method.guard.teacher.named_parameters())
    for name in start:
        expected = 0.9 * start[name] + 0.1 * student[name]
        assert torch.allclose(teacher[name], expected, atol=1e-6), name
    method.finish(model)  # publish="student": the student stays
    assert all(torch.equal(p, student[n]) for n, p in model.named_parameters())


def test_stochastic_restore_brings_back_about_p_of_the_weights():
    model = fresh_model()
    method = build_method("cotta", seed=0, restore_p=0.3)
    start, student = one_step(model, method)
    method.after_step(model, 0)
    total = back = 0
    for name, p in model.named_parameters():
        changed = student[name] != start[name]  # only elements the step moved can come back
        total += int(changed.sum())
        back += int((changed & (p.detach() == start[name])).sum())
        assert torch.all((p.detach() == start[name]) | (p.detach() == student[name])), name
    assert total > 10_000
    assert 0.27 < back / total < 0.33, f"restored {back / total:.3f} of the moved weights, expected about 0.3"


def test_publishes_the_teacher_by_default():
    model = fresh_model()
    method = build_method("cotta", seed=0)
    start, student = one_step(model, method)
    method.after_step(model, 0)
    method.finish(model)
    teacher = dict(method.guard.teacher.named_parameters())
    assert all(torch.equal(p, teacher[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_unsure_teacher_averages_augmented_views():
    torch.manual_seed(0)
    teacher = fresh_model().eval()
    frames = torch.rand(2, 3, 64, 128) * 255
    plain, aug = teacher_probs(teacher, frames, confidence=0.0, num_scales=3, flip=True)
    assert not aug
    averaged, aug = teacher_probs(teacher, frames, confidence=1.0, num_scales=3, flip=True)
    assert aug and averaged.shape == plain.shape
    assert torch.allclose(averaged.sum(1), torch.ones_like(averaged[:, 0]), atol=1e-5)
    assert not torch.allclose(averaged, plain)
    assert views(3, True)[0] == (1.0, False) and len(views(3, True)) == 6 and len(views(2, False)) == 2
    x = torch.rand(1, 4, 8, 16)
    assert torch.equal(unview(scaled_view(x, 1.0, True), (8, 16), True), x)
    assert unview(scaled_view(x, 0.5, True), (8, 16), True).shape == x.shape


def test_soft_cross_entropy_is_entropy_toward_itself_and_resizes():
    logits = torch.randn(2, 5, 6, 10)
    assert torch.allclose(soft_cross_entropy(logits, logits.softmax(1)), softmax_entropy(logits).mean(), atol=1e-5)
    onehot = torch.nn.functional.one_hot(logits.argmax(1), 5).permute(0, 3, 1, 2).float()
    assert soft_cross_entropy(logits, onehot) > soft_cross_entropy(logits * 50, onehot)
    assert soft_cross_entropy(logits, torch.full((2, 5, 3, 5), 0.2)).isfinite()


def test_options_are_declared():
    with pytest.raises(OptionError, match="publish"):
        build_method("cotta", publish="both")
    with pytest.raises(OptionError, match="num_scales"):
        build_method("cotta", num_scales=9)
    assert build_method("cotta", confidence=0.5, num_scales=1, flip=False).confidence == 0.5
