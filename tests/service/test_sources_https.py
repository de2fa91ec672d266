"""HTTPS sources: TLS to the checked address, the certificate verified against the URL's host name."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.sources import fetch
from service.sources.fetch import SourceError, open_container
from service.sources.policy import SourcePolicy
from tests.conftest import SyntheticVideo
from tests.service.sources_support import clip_frames, file_server, write_mp4

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command to make a test certificate")


def _policy() -> SourcePolicy:
    settings = SimpleNamespace(sources_allowed_schemes=["https"], sources_allowed_hosts=["camera.test", "other.test"],
                               sources_file_dir=None)
    return SourcePolicy.from_settings(settings, lambda host, port: ["127.0.0.1"])  # in no real DNS


def test_https_goes_to_the_checked_address_and_verifies_the_host_name(
        tmp_path: Path, synthetic_video: SyntheticVideo, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mp4(tmp_path / "clip.mp4", clip_frames(synthetic_video.frames, 12))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=camera.test", "-addext", "subjectAltName=DNS:camera.test", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    policy = _policy()
    with file_server(tmp_path, server_tls) as (base, hosts):
        port = int(base.rsplit(":", 1)[1])
        with pytest.raises(SourceError, match="CERTIFICATE_VERIFY_FAILED"):  # not in the system's trust store
            open_container(policy.check(f"https://camera.test:{port}/clip.mp4"), policy, 5, 5)
        monkeypatch.setattr(fetch._PinnedTLSConnection, "_context", ssl.create_default_context(cafile=str(cert)))
        with open_container(policy.check(f"https://camera.test:{port}/clip.mp4"), policy, 5, 5) as container:
            assert sum(1 for _ in container.decode(video=0)) == 12
        assert hosts[-1] == f"camera.test:{port}"
        with pytest.raises(SourceError, match="match"):  # same address, another name: not the certificate's
            open_container(policy.check(f"https://other.test:{port}/clip.mp4"), policy, 5, 5)
