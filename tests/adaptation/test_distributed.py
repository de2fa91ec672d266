"""Two CPU processes (gloo) train with DistributedDataParallel and must end with identical weights.

Each rank is a fresh interpreter started like torchrun would (WORLD_SIZE/RANK/LOCAL_RANK/MASTER_*),
running the real ``vss train`` driver on synthetic data, and dumps its parameters (model and the
method's discriminators) for comparison. The ranks read different batches (DistributedSampler), so
equal weights mean the gradients were averaged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from adaptation.offline import OfflineConfig, OfflineRun
    from adaptation.distributed import shutdown, unwrap_model
    base, rank, init = sys.argv[1:4]
    methods = {"davsn": {"ndf": 8},
               "uvda": {"video_discriminator": True, "consistent_mix": True, "refine": "consistency",
                        "threshold": 0.0, "ndf": 8}}
    for method, args in methods.items():  # one process group, one run per method
        cfg = OfflineConfig(method=method, source="synthetic:source", target="synthetic:fog",
                            run_dir=f"{base}/{method}", iters=3, batch=1, lr=1e-2, input_size=(64, 128), init=init,
                            eval_items=2, device="cpu", progress=False, method_args=args,
                            dataset_args={"clips": 1, "frames_per_clip": 6})
        run = OfflineRun(cfg)
        run.run()
        state = {"model." + k: p.detach() for k, p in unwrap_model(run.model).named_parameters()}
        for name, module in run.method.modules().items():
            state.update({name + "." + k: p.detach() for k, p in module.named_parameters()})
        torch.save(state, f"{base}/{method}-rank{rank}.pt")
    shutdown(run.env)
""")
METHODS = ("davsn", "uvda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, init: Path) -> None:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-c", WORKER, str(tmp_path), str(rank), str(init)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    base = tmp_path_factory.mktemp("ddp")
    _launch(base, tiny_checkpoint)
    return base


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_ranks_end_with_identical_weights(method: str, ddp_runs: Path, tiny_checkpoint: Path) -> None:
    ranks = [torch.load(ddp_runs / f"{method}-rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert any(k.startswith("disc.") for k in ranks[0]), "the discriminators must be compared too"
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=1e-6, msg=key)
    from models.checkpoint import load_checkpoint

    init, _ = load_checkpoint(tiny_checkpoint)
    assert any(not torch.equal(p, ranks[0]["model." + k]) for k, p in init.named_parameters()), "nothing trained"
    assert (ddp_runs / method / "best" / "meta.json").is_file()  # rank 0 wrote the checkpoints
