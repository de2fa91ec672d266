"""The sources allow-list (``service.sources.policy``): what a source may open, and why not."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.sources.policy import Malformed, Refused, SourcePolicy, Unresolvable, redact


def policy(hosts: list[str] | None = None, file_dir: Path | None = None, resolve: dict[str, list[str]] | None = None,
           schemes: tuple[str, ...] = ("rtsp", "http", "https", "file")) -> SourcePolicy:
    settings = SimpleNamespace(sources_allowed_schemes=list(schemes), sources_allowed_hosts=hosts or [],
                               sources_file_dir=file_dir)

    def resolver(host: str, port: int) -> list[str]:
        if resolve is None or host not in resolve:
            raise OSError(f"unknown host {host}")
        return resolve[host]

    return SourcePolicy.from_settings(settings, resolver)


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("rtsp://169.254.10.1/cam", "link-local"),
    ("http://[fe80::1]/x", "link-local"),
    ("http://[fd00:ec2::254]/latest/", "cloud-metadata"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),  # IPv4-mapped IPv6
    ("http://100.100.100.200/latest/meta-data", "cloud-metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud-metadata host"),
    ("http://0.0.0.0:8000/", "unspecified"),
])
def test_link_local_and_metadata_are_refused_even_when_every_address_is_allowed(url: str, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        policy(["0.0.0.0/0", "::/0", "metadata.google.internal"]).check(url)


def test_a_name_is_checked_by_every_address_it_resolves_to() -> None:
    p = policy(["10.0.0.0/8"], resolve={"cam.lan": ["10.0.0.7"], "mixed.lan": ["10.0.0.8", "169.254.169.254"],
                                        "decimal": ["169.254.169.254"], "other.lan": ["192.168.1.5"]})
    assert p.check("rtsp://cam.lan/stream").address == "10.0.0.7"
    with pytest.raises(Refused, match="mixed.lan resolves to 169.254.169.254"):
        p.check("http://mixed.lan/x")
    with pytest.raises(Refused, match="link-local"):
        p.check("http://decimal/")  # e.g. 2852039166, which the system resolver turns into 169.254.169.254
    with pytest.raises(Refused, match=r"other.lan \(192.168.1.5\) is not in VSS_SOURCES_ALLOWED_HOSTS"):
        p.check("http://other.lan/x")
    with pytest.raises(Unresolvable, match="cannot resolve nowhere.lan"):
        p.check("http://nowhere.lan/x")


def test_hosts_allowed_by_name_and_wildcard_connect_to_the_checked_address() -> None:
    p = policy(["cam.example.com", "*.cams.example.com"],
               resolve={"cam.example.com": ["203.0.113.5"], "a.cams.example.com": ["203.0.113.6"],
                        "example.com": ["203.0.113.1"]})
    target = p.check("rtsp://user:secret@cam.example.com:8554/live?x=1")
    assert (target.host, target.port, target.address) == ("cam.example.com", 8554, "203.0.113.5")
    # the fetcher connects to the checked address: a second DNS answer cannot move it (no rebinding)
    assert target.pinned_url() == "rtsp://user:secret@203.0.113.5:8554/live?x=1"
    assert p.check("http://a.cams.example.com/x").address == "203.0.113.6"
    with pytest.raises(Refused, match="not in VSS_SOURCES_ALLOWED_HOSTS"):
        p.check("http://example.com/x")
    with pytest.raises(Refused, match="not in VSS_SOURCES_ALLOWED_HOSTS"):
        p.check("http://127.0.0.1/x")


def test_defaults_refuse_every_network_and_file_source() -> None:
    p = policy()
    with pytest.raises(Refused, match="network sources are off"):
        p.check("rtsp://127.0.0.1/cam")
    with pytest.raises(Refused, match="file sources are off"):
        p.check("file:///etc/passwd")


def test_schemes_outside_the_list_are_refused() -> None:
    p = policy(["127.0.0.0/8"], schemes=("rtsp",))
    for url in ("http://127.0.0.1/x.mp4", "ftp://127.0.0.1/x", "gopher://127.0.0.1/", "data:video/mp4;base64,AAAA"):
        with pytest.raises(Refused, match="is not allowed for sources"):
            p.check(url)
    assert p.check("rtsp://127.0.0.1:8554/cam").address == "127.0.0.1"


@pytest.mark.parametrize("url", ["", "127.0.0.1/cam", "http://", "rtsp://:554/x", "http://host:99999/",
                                 "http://exa mple.com/", "http://bad_host!/x", "http://a/\x00", "file://server/x.mp4",
                                 "http://" + "a" * 2100])
def test_malformed_urls(url: str) -> None:
    with pytest.raises(Malformed):
        policy(["0.0.0.0/0"]).check(url)


def test_files_inside_the_directory_only_with_symlinks_resolved(tmp_path: Path) -> None:
    allowed = tmp_path / "videos"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "clip.mp4").write_bytes(b"x")
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"x")
    os.symlink(secret, allowed / "escape.mp4")
    os.symlink(tmp_path, allowed / "up")
    os.symlink(allowed / "sub" / "clip.mp4", allowed / "inside.mp4")
    p = policy(file_dir=allowed)
    assert p.check(f"file://{allowed}/sub/clip.mp4").path == allowed / "sub" / "clip.mp4"
    assert p.check("file:sub/clip.mp4").path == allowed / "sub" / "clip.mp4"  # relative to the directory
    assert p.check(f"file://{allowed}/inside.mp4").path == allowed / "sub" / "clip.mp4"
    for url in (f"file://{secret}", f"file://{allowed}/escape.mp4", f"file://{allowed}/up/secret.mp4",
                f"file://{allowed}/../secret.mp4", "file:../secret.mp4", "file:///etc/passwd"):
        with pytest.raises(Refused, match="outside VSS_SOURCES_FILE_DIR"):
            p.check(url)
    with pytest.raises(Malformed, match="no such file"):
        p.check(f"file://{allowed}/missing.mp4")


def test_bad_allow_list_entries_are_rejected_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValueError, match="neither a host name"):
        policy(["cams/24"])
    monkeypatch.setenv("VSS_SOURCES_ALLOWED_HOSTS", "192.168.1.0/24, cam.lan,bad host")
    with pytest.raises(ValidationError, match="'bad host' is neither a host name"):
        Settings(_env_file=None)
    monkeypatch.setenv("VSS_SOURCES_ALLOWED_HOSTS", "192.168.1.0/24, Cam.Lan")
    monkeypatch.setenv("VSS_SOURCES_ALLOWED_SCHEMES", '["rtsp"]')
    settings = Settings(_env_file=None)
    assert (settings.sources_allowed_hosts, settings.sources_allowed_schemes) == (["192.168.1.0/24", "cam.lan"],
                                                                                  ["rtsp"])


def test_redact_hides_passwords() -> None:
    assert redact("rtsp://admin:hunter2@10.0.0.7:554/live") == "rtsp://admin:***@10.0.0.7:554/live"
    assert redact("http://10.0.0.7/x") == "http://10.0.0.7/x"
