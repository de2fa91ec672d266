"""DA-VSN / TPS importer on a fabricated release: real key names and shapes, same outputs after import."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.accel import build_model
from models.checkpoint import CheckpointError, load_checkpoint
from models.classes import CLASS_SETS
from models.config import get_config
from models.davsn import import_davsn

# vss key prefix -> DA-VSN key prefix (research notes §1.9), written out independently of models.davsn.
TO_DAVSN = (("net.backbone.conv1.", "conv1."), ("net.backbone.bn1.", "bn1."), ("net.backbone.layer", "layer"),
            ("net.aux_head.", "layer5."), ("net.head.", "layer6."), ("fusion.conv.", "sf_layer."))


def to_davsn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = next((dst + key[len(src):] for src, dst in TO_DAVSN if key.startswith(src)), None)
        assert new is not None, key
        out[new] = value
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A fake ``davsn_viper2city_pretrained.pth`` (15 classes) and the model it came from."""
    torch.manual_seed(0)
    model = build_model(get_config("deeplabv2-r101", num_classes=15)).eval()
    with torch.no_grad():
        model.fusion.conv.weight.normal_(0, 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = to_davsn(model.state_dict())
    assert len(state) == 641 and tuple(state["layer6.conv2d_list.0.weight"].shape) == (15, 2048, 3, 3)
    assert tuple(state["layer5.conv2d_list.3.weight"].shape) == (15, 1024, 3, 3)
    assert tuple(state["sf_layer.weight"].shape) == (15, 30, 1, 1)
    path = tmp_path_factory.mktemp("davsn") / "davsn_viper2city_pretrained.pth"
    torch.save(state, path)
    return path, model


def test_import_reproduces_the_outputs(release: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, original = release
    import_davsn(path, "viper", tmp_path / "imported")
    model, meta = load_checkpoint(tmp_path / "imported")
    assert meta["classes"] == list(CLASS_SETS["viper"])
    assert meta["architecture"]["normalization"]["channel_order"] == "BGR"
    assert meta["input_size"] == [512, 1024] and meta["provenance"]["source"] == "davsn-import"
    cur, prev = (torch.rand(2, 3, 65, 129, generator=torch.Generator().manual_seed(1)) * 255).split(1)
    flow = torch.randn(1, 2, 65, 129)
    with torch.inference_mode():
        ref, out = original(cur, prev, flow), model(cur, prev, flow)
    for key in ("fused", "fused_aux", "cur", "prev"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)


def test_wrong_class_count_is_refused(release: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = release
    with pytest.raises(CheckpointError, match="has 15 classes, but --classes synthia has 12"):
        import_davsn(path, "synthia", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_davsn_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "layer6.conv2d_list.0.bias": torch.zeros(15)}, other)
    with pytest.raises(CheckpointError, match="unexpected key 'fc.weight'"):
        import_davsn(other, "viper", tmp_path / "out")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read as a weights-only torch checkpoint"):
        import_davsn(garbage, "viper", tmp_path / "out")
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match="expected a flat state dict"):
        import_davsn(listing, "viper", tmp_path / "out")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        import_davsn(tmp_path / "missing.pth", "viper", tmp_path / "out")
    assert not (tmp_path / "out").exists()
