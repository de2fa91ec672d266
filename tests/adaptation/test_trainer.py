"""THE training loop's contract (``adaptation.trainer.train``) on a toy method and model:
setup before the optimisers, step and data limits, time budget, cancellation, non-finite detection,
gradient clipping, the aux optimiser and the logging cadence."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from adaptation.contract import Method
from adaptation.trainer import Cancelled, LossOutput, NonFiniteLoss, TrainConfig, train


class Toy(Method):
    """Trains ``model.weight`` toward ``target`` (MSE); ``kind`` makes the loss misbehave on purpose."""

    name = "toy"

    def __init__(self, kind: str = "mse", scale: float = 1.0, with_aux: bool = False) -> None:
        self.kind, self.scale = kind, scale
        self.aux = nn.Linear(2, 1) if with_aux else None
        self.calls: list[str] = []

    def setup(self, model: nn.Module) -> None:
        self.calls.append("setup")

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        self.calls.append("param_groups")
        return [{"params": [model.weight], "lr_mult": 1.0}]

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.aux.parameters()), "lr_mult": 1.0}] if self.aux is not None else []

    def train_mode(self, model: nn.Module) -> None:
        self.calls.append("train_mode")
        model.train()

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        w = model.weight
        if self.kind == "nan":
            return LossOutput(w.sum() * float("nan"))
        if self.kind == "inf_grad":  # finite value (0), infinite gradient (d sqrt(x)/dx at 0)
            return LossOutput(torch.sqrt((w - w.detach()).abs().sum()))
        if self.kind == "linear":
            return LossOutput(self.scale * w.sum())
        loss = ((w - batch["target"]) ** 2).mean()
        aux = None
        if self.aux is not None:
            aux = self.aux(w.detach()[:1]).pow(2).sum()  # on detached model outputs, as the contract says
        return LossOutput(loss, aux, {"mse": float(loss.detach())})

    def after_step(self, model: nn.Module, step: int) -> None:
        self.calls.append(f"after_step {step}")


def toy_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 3, bias=False)


def batches(n: int | None = None):
    i = 0
    while n is None or i < n:
        yield {"target": torch.ones(3, 2)}
        i += 1


def test_setup_comes_before_the_groups_and_the_steps_run_in_order() -> None:
    model, method = toy_model(), Toy()
    result = train(model, method, batches(), TrainConfig(steps=3, lr=0.1, optimizer="sgd"))
    assert method.calls == ["setup", "param_groups", "train_mode", "after_step 0", "after_step 1", "after_step 2"]
    assert result.steps == 3 and result.stopped_by == "steps"
    losses = [h["mse"] for h in result.history]
    assert losses[0] > losses[1] > losses[2]  # it does train


def test_step_limit_data_end_and_resume_offset() -> None:
    assert train(toy_model(), Toy(), batches(2), TrainConfig(steps=10)).stopped_by == "data"
    assert train(toy_model(), Toy(), batches(2), TrainConfig(steps=10)).steps == 2
    resumed = train(toy_model(), Toy(), batches(), TrainConfig(steps=5), start_step=3)
    assert resumed.steps == 2 and [h["step"] for h in resumed.history] == [4.0, 5.0]


def test_a_spent_time_budget_stops_before_the_next_step() -> None:
    model = toy_model()
    before = model.weight.detach().clone()
    result = train(model, Toy(), batches(), TrainConfig(steps=100, time_budget_s=0.0))
    assert result.stopped_by == "time" and result.steps == 0 and torch.equal(model.weight, before)


def test_cancellation_raises_between_steps() -> None:
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    method = Toy()
    with pytest.raises(Cancelled, match="cancelled at step 2"):
        train(toy_model(), method, batches(), TrainConfig(steps=10), should_stop=should_stop)
    assert method.calls[-1] == "after_step 1"


@pytest.mark.parametrize("kind,match", [("nan", "non-finite loss at step 0"),
                                        ("inf_grad", "non-finite gradient norm at step 0")])
def test_non_finite_loss_or_gradient_aborts_without_a_step(kind: str, match: str) -> None:
    model = toy_model()
    before = model.weight.detach().clone()
    method = Toy(kind)
    with pytest.raises(NonFiniteLoss, match=match):
        train(model, method, batches(), TrainConfig(steps=3, lr=0.1, grad_clip=1.0))
    assert torch.equal(model.weight, before) and "after_step 0" not in method.calls


@pytest.mark.parametrize("clip", [1.0, None])
def test_gradient_clipping_bounds_the_update(clip: float | None) -> None:
    model = toy_model()
    before = model.weight.detach().clone()
    train(model, Toy("linear", scale=100.0), batches(), TrainConfig(steps=1, lr=1.0, optimizer="sgd", momentum=0.0,
                                                                    grad_clip=clip))
    moved = float(torch.linalg.norm(model.weight.detach() - before))
    expected = 1.0 if clip else 100.0 * math.sqrt(model.weight.numel())  # SGD step = lr x (clipped) gradient
    assert moved == pytest.approx(expected, rel=1e-5)


def test_aux_loss_trains_only_the_methods_modules() -> None:
    model, method = toy_model(), Toy(with_aux=True)
    aux_before = [p.detach().clone() for p in method.aux.parameters()]
    result = train(model, method, batches(), TrainConfig(steps=2, lr=0.1, aux_lr=0.5))
    assert all(not torch.equal(a, p) for a, p in zip(aux_before, method.aux.parameters()))
    assert "aux_loss" in result.history[0]


def test_logging_cadence_and_last_step() -> None:
    logged: list[int] = []
    train(toy_model(), Toy(), batches(), TrainConfig(steps=7, log_every=3), on_log=lambda s, logs: logged.append(s))
    assert logged == [3, 6, 7]


def test_a_method_without_trainable_parameters_is_refused() -> None:
    class Empty(Toy):
        def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
            return [{"params": [], "lr_mult": 1.0}]

    with pytest.raises(ValueError, match="declares no trainable parameters"):
        train(toy_model(), Empty(), batches(), TrainConfig(steps=1))
