"""POST /v1/adapt with labeled_frames: refused precisely without labeled clips or with bn, accepted otherwise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.test_hardening import AUTH, error, settings_for


def test_labeled_frames_need_val_clips_and_a_training_method(tmp_path: Path,
                                                             start_client: Callable[[Settings], TestClient]) -> None:
    client = start_client(settings_for(tmp_path))
    found = error(client.post("/v1/adapt", json={"method": "srcstats", "labeled_frames": 4}, headers=AUTH), 422,
                  "no_labeled_clips")
    assert "VSS_VAL_DIR" in found["message"]
    error(client.post("/v1/adapt", json={"method": "tent", "labeled_frames": 5}, headers=AUTH), 422,
          "invalid_request")


def test_labeled_frames_pass_validation_with_val_clips(tmp_path: Path,
                                                       start_client: Callable[[Settings], TestClient]) -> None:
    (tmp_path / "val").mkdir()
    client = start_client(settings_for(tmp_path, val_dir=tmp_path / "val"))
    error(client.post("/v1/adapt", json={"method": "bn", "labeled_frames": 2}, headers=AUTH), 422, "invalid_request")
    # accepted: what stops it now is the empty clip buffer, checked after the request's validation
    error(client.post("/v1/adapt", json={"method": "tent", "labeled_frames": 2}, headers=AUTH), 409,
          "not_enough_clips")
