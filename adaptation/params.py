"""Which parameters a method trains and how BatchNorm behaves while it trains (shared by the methods)."""

from __future__ import annotations

from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
PARAM_POLICIES = ("all", "backbone", "bn", "heads")


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def bn_affine_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named weight/bias of every BatchNorm layer (TENT's parameter set)."""
    names = {id(m) for m in bn_layers(model)}
    out = []
    for mod_name, mod in model.named_modules():
        if id(mod) in names:
            out += [(f"{mod_name}.{n}", p) for n, p in mod.named_parameters(recurse=False)]
    return out


def select_params(model: nn.Module, policy: str) -> list[tuple[str, nn.Parameter]]:
    """Named parameters a method trains: ``all`` (per-frame net + fusion), ``backbone`` (trunk only),
    ``heads`` (ASPP classifiers + fusion) or ``bn`` (BatchNorm affine only)."""
    if policy == "bn":
        return bn_affine_params(model)
    named = list(model.named_parameters())
    if policy == "all":
        return named
    if policy == "backbone":
        return [(n, p) for n, p in named if n.startswith("net.backbone")]
    if policy == "heads":
        return [(n, p) for n, p in named if not n.startswith("net.backbone")]
    raise ValueError(f"unknown parameter policy {policy!r}; choose one of {PARAM_POLICIES}")


def set_bn_mode(model: nn.Module, bn_train: bool) -> None:
    """Model in eval mode (no dropout etc.); BatchNorm layers in train mode iff ``bn_train``.

    In train mode BN normalises with batch statistics and updates its running statistics, which is
    what the model uses afterwards in eval mode (so TENT-style adaptation also moves the stats).
    """
    model.eval()
    for m in bn_layers(model):
        m.train(bn_train)
