"""Dataset loaders on tiny fabricated trees with the real file naming (64x128 frames), specs and errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from adaptation.datasets import DatasetError, build_dataset, label_space_of, parse_spec
from adaptation.datasets.cityscapes_seq import CityscapesSeq
from adaptation.datasets.synthia_seq import SynthiaSeq
from adaptation.datasets.viper import Viper, remove_ego_vehicle
from models.classes import IGNORE_INDEX as IGNORE
from tests.adaptation.trees import H, W, flow_file, make_cityscapes, make_viper, palette_png, rgb


# ---- Cityscapes-Seq -------------------------------------------------------------------------
@pytest.fixture()
def cityscapes(tmp_path: Path) -> Path:
    return make_cityscapes(tmp_path)


def test_cityscapes_items_labels_and_precomputed_flow(cityscapes: Path) -> None:
    ds = CityscapesSeq(cityscapes, "train", "viper", (H, W), extras=("prev2",))
    assert len(ds) == 1 and ds.classes[9] == "person"
    item = ds[0]
    assert item["cur"].shape == item["prev"].shape == item["prev2"].shape == (3, H, W)
    assert item["cur"].dtype == torch.float32 and float(item["cur"].max()) <= 255
    assert item["flow"].shape == item["flow_prev"].shape == (2, H, W)
    # 1 px at half resolution is (W-1)/(W/2-1) px at the input size (vectors scale with the grid)
    assert item["flow"][0].mean().item() == pytest.approx((W - 1) / (W // 2 - 1), rel=1e-4)
    assert item["flow"][1].mean().item() == pytest.approx((H - 1) / (H // 2 - 1), rel=1e-4)
    assert item["flow_prev"][0].mean().item() == pytest.approx(-2 * (W - 1) / (W // 2 - 1), rel=1e-4)
    lab = item["label"]
    assert lab.dtype == torch.int64 and lab.shape == (H, W)
    assert lab[0, 0] == 8 and lab[25, 0] == 0 and lab[45, 0] == 9 and lab[45, 100] == 10 and lab[60, 0] == IGNORE
    # the SYNTHIA label space keeps rider as its own class
    syn = CityscapesSeq(cityscapes, "train", "synthia", (H, W), flow="none")
    assert syn[0]["label"][45, 0] == 10 and syn.eval_exclude == ("fence",)
    assert torch.count_nonzero(syn[0]["flow"]) == 0


def test_cityscapes_next_frame_dis_flow_and_native_labels(cityscapes: Path) -> None:
    ds = CityscapesSeq(cityscapes, "val", "viper", (32, 64), flow="dis", extras=("next", "flow_fwd"),
                       native_labels=True)
    item = ds[0]
    assert item["next"].shape == (3, 32, 64) and item["flow_next"].shape == item["flow_fwd"].shape == (2, 32, 64)
    assert torch.isfinite(item["flow"]).all() and item["label"].shape == (H, W)


def test_cityscapes_errors_name_the_path(cityscapes: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="leftImg8bit_sequence"):
        CityscapesSeq(tmp_path / "nowhere", "train", "viper", (H, W))
    frame = cityscapes / "leftImg8bit_sequence/train/aachen/aachen_000000_000018_leftImg8bit.png"
    frame.unlink()
    with pytest.raises(FileNotFoundError, match="aachen_000000_000018_leftImg8bit.png"):
        CityscapesSeq(cityscapes, "train", "viper", (H, W), flow="dis")
    with pytest.raises(FileNotFoundError, match="000019_000018_int16_x10.npy"):
        CityscapesSeq(cityscapes, "val", "viper", (H, W), flow_dir=tmp_path / "Cityscapes", extras=())
    bad = cityscapes / "gtFine/val/aachen/aachen_19_gtFine_labelIds.png"
    bad.write_bytes(b"")
    with pytest.raises(DatasetError, match="aachen_19_gtFine_labelIds.png"):
        CityscapesSeq(cityscapes, "val", "viper", (H, W), flow="dis")
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="flow directory"):
        CityscapesSeq(cityscapes, "val", "viper", (H, W), flow="precomputed")


# ---- VIPER ------------------------------------------------------------------------------------
@pytest.fixture()
def viper(tmp_path: Path) -> Path:
    return make_viper(tmp_path)


def test_viper_mapping_ego_vehicle_and_flow(viper: Path) -> None:
    ds = Viper(viper, "train", (H, W), extras=("prev2",))
    item = ds[0]
    lab = item["label"]
    assert lab[0, 0] == 8 and lab[40, 0] == 0  # sky, road
    assert lab[60, 64] == IGNORE  # the ego vehicle is ignored
    assert lab[25, 10] == 10  # any other car is a car
    assert lab[25, 110] == IGNORE  # van is not among the 15 classes
    assert item["flow"][0].mean().item() == pytest.approx(0.5)
    assert len(ds.classes) == 15


def test_remove_ego_vehicle_only_touches_the_bottom_component() -> None:
    raw = np.zeros((8, 8), np.int64)
    raw[6:, 2:6] = 24
    raw[0:2, 0:2] = 24
    out = remove_ego_vehicle(raw)
    assert (out[6:, 2:6] == 0).all() and (out[0:2, 0:2] == 24).all()


def test_viper_errors(viper: Path) -> None:
    (viper / "train/img/001/001_00009.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="001_00009.jpg"):
        Viper(viper, "train", (H, W), flow="dis")
    palette_png(viper / "train/cls/001/1_10.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match="1_10.png"):
        Viper(viper, "train", (H, W), flow="dis")
    with pytest.raises(FileNotFoundError, match="val/img"):
        Viper(viper, "val", (H, W), flow="dis")
    (viper / "train/cls/001/1_10.png").unlink()
    (viper / "train/cls/001/001_00010.png").rename(viper / "train/cls/001/001_00020.png")
    with pytest.raises(FileNotFoundError, match="001_00020.jpg"):  # a label without its frames
        Viper(viper, "train", (H, W), flow="dis")


# ---- SYNTHIA-Seq ------------------------------------------------------------------------------
@pytest.fixture()
def synthia(tmp_path: Path) -> Path:
    root = tmp_path / "SynthiaSeq"
    seq = root / "SEQS-04-DAWN"
    full = (76, 128)  # 760x1280 scaled by 1/10: the bottom 12 rows are the cropped bonnet
    for f in range(4):
        rgb(seq / "rgb" / f"{f:06d}.png", f, full)
        ids = np.full(full, 3, np.uint16)  # road
        ids[:10] = 1  # sky
        ids[30:40, :50] = 8  # car
        ids[30:40, 50:] = 11  # bicycle -> "rider"
        ids[40:45] = 1000  # an id out of range -> ignore
        bgr = np.zeros((*full, 3), np.uint16)
        bgr[..., 2] = ids  # the class id is in R; OpenCV writes BGR
        (seq / "label").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(seq / "label" / f"{f:06d}.png"), bgr)
    flows = tmp_path / "Estimated_optical_flow_SynthiaSeq_train"
    for f in range(1, 4):
        flow_file(flows / f"{f:06d}_int16_x10.npy", 1.0, (38, 64))  # full-frame aspect, half resolution
    return root


def test_synthia_crop_mapping_and_flow(synthia: Path) -> None:
    ds = SynthiaSeq(synthia, "train", (32, 64), extras=("prev2",), native_labels=True)
    assert [i for i in ds.items] == [2, 3]  # frames 0 and 1 lack k-2
    item = ds[0]
    lab = item["label"]
    assert lab.shape == (64, 128)  # 76 rows minus the bottom 12
    assert lab[0, 0] == 8 and lab[20, 0] == 0 and lab[35, 0] == 11 and lab[35, 100] == 10 and lab[42, 0] == IGNORE
    assert item["flow"].shape == (2, 32, 64)
    assert item["flow"][0].mean().item() == pytest.approx(63 / 63, rel=1e-4)
    assert ds.eval_exclude == ("fence",) and len(ds.classes) == 12
    assert len(SynthiaSeq(synthia, "train", (32, 64))) == 3


def test_synthia_missing_frame_and_bad_name(synthia: Path) -> None:
    (synthia / "SEQS-04-DAWN/rgb/000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="000002.png"):
        SynthiaSeq(synthia, "train", (32, 64), flow="dis")
    (synthia / "SEQS-04-DAWN/label/frame7.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="frame7.png"):
        SynthiaSeq(synthia, "train", (32, 64), flow="dis")


# ---- synthetic and specs ---------------------------------------------------------------------
def test_synthetic_is_deterministic_with_exact_flow() -> None:
    kw = dict(input_size=(H, W), extras=("prev2",), clips=1, frames_per_clip=5)
    a = build_dataset("synthetic:source", "train", **kw)
    b = build_dataset("synthetic:source", "train", **kw)
    val = build_dataset("synthetic:source", "val", **kw)
    assert len(a) == 2 and a.classes == ("road", "sidewalk", "building", "vegetation", "sky", "person", "car")
    x, y, v = a[1], b[1], val[1]
    for key in ("cur", "prev", "prev2", "flow", "flow_prev", "label"):
        assert torch.equal(x[key], y[key]), key
    assert not torch.equal(x["cur"], v["cur"])  # train and val are different scenes
    clip = a._clip(1)
    assert torch.equal(x["flow"], torch.tensor(clip.flow[3]).permute(2, 0, 1))
    assert int(x["label"].max()) < 7
    target = build_dataset("synthetic:fog", "train", labels=False, **kw)
    assert "label" not in target[0]


def test_specs() -> None:
    assert parse_spec("viper:/data/Viper").arg == "/data/Viper"
    assert parse_spec("synthetic:fog").name == "synthetic"
    assert parse_spec("cityscapes-seq:C:/x").arg == "C:/x"
    for bad in ("viper", "mnist:/x", "synthetic:"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    with pytest.raises(ValueError, match="style"):
        build_dataset("synthetic:nope", "train", (H, W))
    with pytest.raises(ValueError, match="only the synthetic"):
        build_dataset("viper:/nowhere", "train", (H, W), flow="gt")
    assert label_space_of(["road", "sidewalk", "building", "vegetation", "sky", "person", "car"]) == "synthetic"
