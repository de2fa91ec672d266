"""`vss worker`: run the adaptation worker standalone, against a model directory and a clip buffer
shared with one or more `vss serve` replicas (start those with VSS_WORKER=external).

    vss worker --model-dir /data/models --buffer-dir /data/buffer [--device cuda] [--auto]

It polls the job directory (default <buffer-dir>/jobs) for jobs queued by `POST /v1/adapt`, adapts
its own copy of the ACTIVE version, and publishes + activates only candidates that pass the gate. With
--auto (VSS_ADAPT_AUTO=1) it also starts rounds by itself when drift persists in the shared buffer.
Flags override the VSS_* environment variables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run the adaptation worker (for servers started with VSS_WORKER=external)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="model registry directory shared with the servers (default: $VSS_MODEL_DIR)")
    p.add_argument("--buffer-dir", default=None, metavar="DIR",
                   help="clip buffer directory shared with the servers (default: $VSS_BUFFER_DIR)")
    p.add_argument("--job-dir", default=None, metavar="DIR",
                   help="adaptation job directory (default: $VSS_ADAPT_JOB_DIR or <buffer-dir>/jobs)")
    p.add_argument("--val-dir", type=Path, default=None, metavar="DIR",
                   help="labeled validation clips (*.npz: frames, labels): the gate then decides on mIoU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to adapt")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: $VSS_ADAPT_THREADS or 1)")
    p.add_argument("--auto", action="store_true", default=None,
                   help="start rounds by itself when drift persists (VSS_ADAPT_AUTO=1; README 'Automatic rounds')")
    p.add_argument("--auto-clips", type=int, default=None, metavar="N",
                   help="older trigger, without --auto: a job when N new clips arrived since the last one (0: off)")
    p.add_argument("--once", action="store_true", help="run at most one queued job, then exit")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.settings import Settings
    from service.worker import serve_worker

    overrides = {"model_dir": args.model_dir, "buffer_dir": args.buffer_dir, "adapt_job_dir": args.job_dir,
                 "val_dir": args.val_dir, "adapt_device": args.device, "adapt_threads": args.threads,
                 "adapt_auto": args.auto, "adapt_auto_clips": args.auto_clips, "log_level": args.log_level}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise CLIError(f"invalid settings: {err['loc'][0]}: {err['msg']}") from e
    if settings.val_dir is not None and not settings.val_dir.is_dir():
        raise CLIError(f"--val-dir {settings.val_dir} is not a directory")
    print(f"vss: adaptation worker on models {settings.model_dir}, buffer {settings.buffer_dir}, "
          f"jobs {settings.job_root()}", flush=True)
    return serve_worker(settings, once=args.once)
