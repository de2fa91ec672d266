"""Service settings, read from ``VSS_*`` environment variables (and an optional ``.env`` file).

``Settings`` is composed of small groups, one class per concern (server, logging, registry and store,
inference, optical flow, request limits, upload jobs, clip buffer, collection, adaptation worker,
server-side sources, per-domain routing). A field keeps its flat name (``Settings().buffer_max_clips``,
``Settings(buffer_max_clips=...)``, ``VSS_BUFFER_MAX_CLIPS``); the groups only say where it belongs
and what a spawned adaptation worker inherits (``WORKER_GROUPS``). A new field goes into the group of
its concern; a new concern gets its own group, listed in ``Settings``' bases (and in
``WORKER_GROUPS`` when the worker reads it). Validator names must be unique across the groups: the
composed class keeps one validator per name.

Nothing here runs at import: ``Settings()`` is built inside ``service.app.create_app`` (or by the
CLI, which passes its flags as keyword overrides; keyword arguments beat the environment).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.config import DEMO_MODEL_DIR as BUNDLED_DEMO_MODEL

MIB = 1024 * 1024

# A local directory (Path) or an object store URL (``s3://bucket/prefix``, kept as a string).
StoreLocation = Annotated[str, StringConstraints(pattern=r"^s3://")] | Path


def _none_if_off(value: object) -> object:
    """An empty/``none``/``off`` string in the environment unsets an optional path."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "off") else value


class ServerSettings(BaseModel):
    """Network and security of the HTTP server."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="bearer token required by mutating routes")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins (none by default)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: how long in-flight uploads may take to "
                                   "finish before the server stops anyway (streams are closed at once, with 1012)")

    def api_key_value(self) -> str | None:
        """The API key as a plain string, or None when auth is off."""
        if self.api_key is None:
            return None
        key = self.api_key.get_secret_value()
        return key or None


class LoggingSettings(BaseModel):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="log lines: json (one object per line, for collectors), text (for people), auto: "
                            "text when stderr is a terminal, else json")
    log_json: bool | None = Field(None, description="older switch, wins over log_format when set: true = json, "
                                                    "false = text")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def json_logs(self, terminal: bool) -> bool:
        """Whether logs are JSON lines, for a process whose stderr is (or is not) a terminal."""
        if self.log_json is not None:
            return self.log_json
        return self.log_format == "json" or (self.log_format == "auto" and not terminal)


class StoreSettings(BaseModel):
    """Where models, clips and caches live, and how the model registry is watched."""

    model_config = ConfigDict(protected_namespaces=("settings_",))  # model_dir is a field, not pydantic's

    model_dir: StoreLocation = Field(Path("var/models"), description="model registry: a directory or "
                                     "s3://bucket/prefix (v0001/, ..., ACTIVE)")
    buffer_dir: StoreLocation = Field(Path("var/buffer"), description="clip buffer of target videos: a directory "
                                      "or s3://bucket/prefix (shared by the fleet)")
    val_dir: Path | None = Field(None, description="optional labelled validation clips for the publish gate")
    cache_dir: Path = Field(Path("var/cache"), description="ONNX exports of read-only versions, TensorRT engines, "
                            "verified copies of versions from an s3:// registry")
    demo_model: Path | None = Field(BUNDLED_DEMO_MODEL,
                                    description="checkpoint that seeds an empty registry (empty/none: do not seed)")
    registry_poll_ms: int = Field(1000, ge=10, description="how often every process checks the ACTIVE pointer")
    registry_retry_s: float = Field(30.0, ge=0, description="wait before retrying a version that failed to load")

    @field_validator("demo_model", "val_dir", mode="before")
    @classmethod
    def _store_path_off(cls, value: object) -> object:
        return _none_if_off(value)


class InferenceSettings(BaseModel):
    """The serving engine, and batching across streams (``service/batcher.py``)."""

    engine: Literal["torch", "onnx"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    half: bool = Field(False, description="fp16 inference on CUDA (torch engine; TensorRT fp16 for onnx)")
    intra_op_threads: int = Field(0, ge=0, description="threads per inference call (0: backend default)")
    onnx_exporter: Literal["legacy", "dynamo"] = Field("legacy", description="torch exporter for on-demand exports")
    onnx_tensorrt: bool = Field(True, description="try the TensorRT provider first when onnxruntime-gpu has it")
    warmup: bool = Field(True, description="run one inference before a model version starts serving")
    batch_max: int = Field(1, ge=1, le=256, description="most frames of concurrent streams and uploads in one "
                           "network call (1: no batching)")
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a frame may wait for others to join "
                                 "its batch")


class FlowSettings(BaseModel):
    """Optical flow, for serving and for adaptation."""

    flow: str = Field("dis", description="optical flow provider: dis[-preset], none, raft[-small|-large]")
    raft_weights: Path | None = None

    @field_validator("raft_weights", mode="before")
    @classmethod
    def _raft_weights_off(cls, value: object) -> object:
        return _none_if_off(value)


class LimitSettings(BaseModel):
    """The request budget (``service/budget.py``) of uploads and streams; adaptation jobs' limits are
    ``AdaptationSettings.adapt_max_steps`` / ``adapt_max_time_s``."""

    max_upload_bytes: int = Field(512 * MIB, ge=1)
    max_frames: int = Field(9000, ge=1)
    max_width: int = Field(3840, ge=16)
    max_height: int = Field(2160, ge=16)
    max_duration_s: float = Field(600.0, gt=0)
    max_pixels: int = Field(3840 * 2160, ge=64 * 64, description="largest image one request decodes or produces: an "
                            "input frame, an uploaded image, a label map of any requested size, an overlay frame")
    max_inference_pixels: int = Field(2048 * 1024, ge=64 * 64, description="largest network input of one frame "
                                      "(the upload `size` override)")
    decode_timeout_s: float = Field(20.0, gt=0, description="limit for probing an upload and for any one frame")
    decode_memory_mb: int = Field(1024, ge=64, description="address-space limit of the isolated decoder process")
    ws_queue_size: int = Field(4, ge=1, description="frames queued per websocket before stale ones are dropped")
    ws_max_message_bytes: int = Field(16 * MIB, ge=1024)


class UploadJobSettings(BaseModel):
    """Long uploads run as background jobs (``service/segment_jobs.py``)."""

    job_frame_threshold: int = Field(300, ge=1, description="uploads with more frames run as background jobs")
    job_dir: Path = Field(Path("var/jobs"), description="results of upload jobs")
    job_ttl_s: float = Field(3600.0, gt=0, description="how long finished job results are kept")


class BufferSettings(BaseModel):
    """The clip buffer of target videos and how served frames are sampled into it."""

    buffer_enabled: bool = Field(True, description="sample served frames into the clip buffer")
    buffer_max_bytes: int = Field(2048 * MIB, ge=0)
    buffer_max_clips: int = Field(500, ge=1, description="clips kept in the buffer (oldest evicted first)")
    buffer_clip_frames: int = Field(8, ge=2, le=64, description="consecutive frames per sampled clip")
    buffer_clip_every: int = Field(240, ge=2, description="a sampled clip starts every this many served frames")
    buffer_heldout_fraction: float = Field(0.25, gt=0, lt=1, description="share of clips kept for the publish "
                                           "gate only (chosen by a hash of the clip's frames)")


class CollectSettings(BaseModel):
    """Who may feed the clip buffer, and how much (``service/collect.py``)."""

    collect: Literal["auto", "all", "authenticated", "off"] = Field(
        "auto", description="whose uploads and streams may become training clips: all, authenticated (requests "
        "that carry the API key), off; auto: authenticated when api_key is set, else all")
    collect_rate_clips: int = Field(60, ge=1, description="clips one client (API key, else address) may add to "
                                    "the buffer per window")
    collect_rate_window_s: float = Field(600.0, gt=0, description="the window of collect_rate_clips, in seconds")


class AdaptationSettings(BaseModel):
    """The adaptation worker, its jobs and their limits."""

    worker: Literal["spawn", "external", "off"] = Field(
        "spawn", description="adaptation worker: spawn a child process, rely on `vss worker`, or none")
    adapt_job_dir: StoreLocation | None = Field(None, description="adaptation job files, a directory or s3:// URL "
                                                "(default: <buffer_dir>/jobs)")
    adapt_device: Literal["auto", "cpu", "cuda"] = "auto"
    adapt_threads: int = Field(1, ge=1, description="torch threads of the worker on CPU (leave cores to serving)")
    adapt_nice: int = Field(10, ge=0, le=19, description="scheduling niceness added to the worker process")
    adapt_min_clips: int = Field(2, ge=1, description="training clips the buffer must hold to start a job")
    adapt_max_clips: int = Field(32, ge=1, description="newest buffered clips one job uses")
    adapt_max_steps: int = Field(5000, ge=1, description="largest `steps` a job may ask for")
    adapt_max_time_s: float = Field(3600.0, gt=0, description="largest `time_budget_s` of an adaptation job, and "
                                    "the time limit of jobs that give none")
    adapt_poll_s: float = Field(0.5, gt=0, description="how often the worker looks for queued jobs")
    adapt_heartbeat_s: float = Field(2.0, gt=0, description="how often the worker proves it is alive")
    adapt_heartbeat_timeout_s: float = Field(30.0, gt=0, description="a running job whose worker is silent "
                                             "this long is marked failed")
    adapt_auto_clips: int = Field(0, ge=0, description="start a job when this many clips arrived since the last "
                                  "one (0: off)")
    adapt_auto_method: str = "tent"
    adapt_auto_steps: int = Field(100, ge=1)
    adapt_keep_jobs: int = Field(100, ge=1, description="finished job records kept")

    @field_validator("adapt_job_dir", mode="before")
    @classmethod
    def _job_dir_off(cls, value: object) -> object:
        return _none_if_off(value)


class AutoRoundSettings(BaseModel):
    """Automatic rounds of the adaptation worker (issue 13; service/auto_policy.py, service/auto_rounds.py;
    README "Automatic rounds"). The method and steps of a round are ``adapt_auto_method``/``adapt_auto_steps``."""

    adapt_auto: bool = Field(False, description="the worker starts rounds by itself when drift persists "
                             "(off: only the older adapt_auto_clips trigger, if set)")
    adapt_auto_interval_s: float = Field(60.0, ge=0, description="least seconds between two automatic rounds")
    adapt_auto_min_clips: int = Field(4, ge=1, description="drifted clips that must arrive since the last round "
                                      "(in one cluster) to start one")
    adapt_auto_distance: float = Field(2.5, gt=0, description="a buffered clip whose signature is farther than "
                                       "this (within-domain standard deviations) from every served version is drifted")
    adapt_domains: bool = Field(True, description="automatic rounds publish per-domain versions (ACTIVE stays); "
                                "false: a single chain, a passing candidate is activated")
    adapt_gate: Literal["stat", "off"] = Field("stat", description="automatic rounds publish only what passes the "
                                               "statistical gate; off: always publish (a baseline)")
    adapt_reset_every: int = Field(0, ge=0, description="every K-th automatic round starts from the base version "
                                   "(periodic reset); 0: never")


class SourcesSettings(BaseModel):
    """Server-side sources (``POST /v1/sources``; README "Server-side sources")."""

    sources_allowed_schemes: Annotated[list[str], NoDecode] = Field(
        ["rtsp", "http", "https", "file"], description="URL schemes a source may use")
    sources_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="host names (exact, or *.suffix), addresses or CIDR networks a source "
        "may connect to (empty: no network source is allowed)")
    sources_file_dir: Path | None = Field(None, description="the one directory file:// sources may read "
                                          "(unset: file:// is refused)")
    sources_max: int = Field(4, ge=0, description="sources kept at once (running or not; DELETE frees one)")
    sources_queue_size: int = Field(2, ge=1, description="decoded frames waiting per source before stale "
                                    "ones are dropped")
    sources_connect_timeout_s: float = Field(10.0, gt=0, description="limit for opening a source")
    sources_read_timeout_s: float = Field(10.0, gt=0, description="a source silent this long has dropped")
    sources_reconnect_min_s: float = Field(0.5, gt=0, description="first wait before reconnecting")
    sources_reconnect_max_s: float = Field(30.0, gt=0, description="longest wait between reconnects "
                                           "(the wait doubles from sources_reconnect_min_s)")
    sources_reconnect_attempts: int = Field(0, ge=0, description="failed reconnects in a row before a "
                                            "source is marked failed (0: keep trying)")
    sources_output_dir: Path = Field(Path("var/sources"), description="where sinks write overlay segments "
                                     "(<dir>/<source id>/) and HLS playlists")
    sources_segment_keep: int = Field(100, ge=1, description="overlay segments kept per source by the disk "
                                      "sink (oldest deleted first)")
    sources_hls_list_size: int = Field(6, ge=2, description="segments listed in a source's HLS playlist")

    @field_validator("sources_allowed_schemes", "sources_allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """``a,b`` or a JSON list in the environment; entries are trimmed and lower-cased."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        if isinstance(value, list | tuple):
            return [str(v).strip().lower() for v in value]
        return value

    @field_validator("sources_allowed_hosts")
    @classmethod
    def _hosts_parse(cls, value: list[str]) -> list[str]:
        from .sources.policy import parse_hosts  # stdlib only; raises ValueError for a bad entry

        parse_hosts(value)
        return value

    @field_validator("sources_file_dir", mode="before")
    @classmethod
    def _no_file_dir(cls, value: object) -> object:
        return _none_if_off(value)


class RoutingSettings(BaseModel):
    """Per-domain versions and routing (``service/routing.py``; issue 13 item 3)."""

    route_max_versions: int = Field(4, ge=0, description="domain versions (meta.json 'domain', not retired) each "
                                    "process loads next to the active one, newest first (0: no routing)")
    route_max_distance: float = Field(2.5, gt=0, description="a stream is served by a domain version only when its "
                                      "signature is at most this far from the version's (models/signature.py "
                                      "units) and nearer than the active version's own signature")
    route_margin: float = Field(0.25, ge=0, description="a stream switches versions only when the new one is "
                                "nearer by at least this much (each switch is a keyframe)")
    route_poll_s: float = Field(5.0, ge=0, description="how often every process lists the registry for new and "
                                "retired domain versions (at once when the active version changes)")
    route_sample_every: int = Field(4, ge=1, description="a stream's domain signature is computed on every this "
                                    "many-th frame (~1 ms at 256x512, ~7 ms at 720p on one CPU core)")


class Settings(ServerSettings, LoggingSettings, StoreSettings, InferenceSettings, FlowSettings, LimitSettings,
               UploadJobSettings, BufferSettings, CollectSettings, AdaptationSettings, AutoRoundSettings,
               SourcesSettings, RoutingSettings, BaseSettings):
    """Every knob of a ``vss`` server process; ``VSS_<FIELD>`` in the environment sets a field."""

    model_config = SettingsConfigDict(env_prefix="VSS_", env_file=".env", extra="ignore",
                                      protected_namespaces=("settings_",))

    def job_root(self) -> Path | str:
        """Directory (or ``s3://`` URL) of the adaptation job files (shared by servers and workers)."""
        if self.adapt_job_dir is not None:
            return self.adapt_job_dir
        if isinstance(self.buffer_dir, str):
            return f"{self.buffer_dir.rstrip('/')}/jobs"
        return self.buffer_dir / "jobs"


# What a spawned adaptation worker inherits from its server (``service.worker.worker_settings_json``);
# everything else it reads from the environment like any process. No secret belongs in these groups:
# the JSON is on the worker's command line.
WORKER_GROUPS: tuple[type[BaseModel], ...] = (StoreSettings, FlowSettings, BufferSettings, AdaptationSettings,
                                              AutoRoundSettings, LoggingSettings)
WORKER_FIELDS = frozenset(name for group in WORKER_GROUPS for name in group.model_fields)
