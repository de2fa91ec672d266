"""Settings are grouped by concern, but every field keeps its flat name and ``VSS_*`` variable; a spawned
worker inherits exactly the worker groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from service import settings as settings_module
from service.settings import WORKER_FIELDS, WORKER_GROUPS, Settings
from service.worker import worker_settings_json

GROUPS = [base for base in Settings.__mro__[1:] if issubclass(base, BaseModel) and base.__module__ ==
          settings_module.__name__]


def test_every_field_belongs_to_exactly_one_group() -> None:
    owners: dict[str, list[str]] = {}
    for group in GROUPS:
        for name in group.model_fields:
            owners.setdefault(name, []).append(group.__name__)
    assert set(owners) == set(Settings.model_fields)
    assert {name: groups for name, groups in owners.items() if len(groups) > 1} == {}
    assert set(WORKER_GROUPS) <= set(GROUPS)


def test_every_group_validator_survives_the_composition() -> None:
    """Validators are kept by name in the composed class: two groups with one name would lose one."""
    per_group = [name for group in GROUPS for name in group.__pydantic_decorators__.field_validators]
    assert sorted(per_group) == sorted(Settings.__pydantic_decorators__.field_validators)


def test_environment_names_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """One field of every group from its ``VSS_`` variable, including the ``before`` validators of the groups."""
    env = {"VSS_PORT": "9001", "VSS_LOG_LEVEL": "DEBUG", "VSS_MODEL_DIR": "s3://bucket/models",
           "VSS_DEMO_MODEL": "none", "VSS_BATCH_MAX": "4", "VSS_RAFT_WEIGHTS": "off", "VSS_MAX_FRAMES": "12",
           "VSS_JOB_TTL_S": "5", "VSS_BUFFER_MAX_CLIPS": "7", "VSS_COLLECT": "off", "VSS_ADAPT_JOB_DIR": "",
           "VSS_ADAPT_THREADS": "3", "VSS_SOURCES_ALLOWED_HOSTS": "Cam.example, 10.0.0.0/8"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings(_env_file=None, batch_max=2)  # a keyword beats the environment
    assert (s.port, s.log_level, s.model_dir, s.demo_model, s.batch_max, s.raft_weights) == \
        (9001, "debug", "s3://bucket/models", None, 2, None)
    assert (s.max_frames, s.job_ttl_s, s.buffer_max_clips, s.collect, s.adapt_job_dir, s.adapt_threads) == \
        (12, 5.0, 7, "off", None, 3)
    assert s.sources_allowed_hosts == ["cam.example", "10.0.0.0/8"]


def test_a_spawned_worker_inherits_the_worker_groups(tmp_path: Path) -> None:
    server = Settings(_env_file=None, model_dir=tmp_path / "models", buffer_dir="s3://bucket/buffer",
                      log_format="text", buffer_max_clips=9, adapt_max_time_s=60, flow="none",
                      api_key="secret-key", port=9002)
    values = json.loads(worker_settings_json(server))
    assert set(values) == set(WORKER_FIELDS)
    assert {"model_dir", "buffer_dir", "flow", "buffer_max_clips", "adapt_max_time_s", "log_format"} <= WORKER_FIELDS
    assert not {"api_key", "port", "engine", "max_frames"} & WORKER_FIELDS  # the server's own, or secret
    assert not any(Settings.model_fields[name].annotation in (SecretStr, SecretStr | None) for name in WORKER_FIELDS)
    worker = Settings(_env_file=None, **values)
    for name in WORKER_FIELDS - {"adapt_job_dir"}:
        assert getattr(worker, name) == getattr(server, name), name
    assert worker.adapt_job_dir == "s3://bucket/buffer/jobs" == server.job_root()
