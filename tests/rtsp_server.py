"""A real RTSP server for the sources tests: GStreamer's gst-rtsp-server serving a live H.264 test pattern.

Run it with the SYSTEM python (``python3-gi`` and ``gir1.2-gst-rtsp-server-1.0`` are Debian packages,
not in the venv)::

    /usr/bin/python3 tests/rtsp_server.py --port 0 [--path /cam] [--width 160 --height 96 --fps 10]

It binds 127.0.0.1 only, offers RTP over the RTSP TCP connection only (interleaved, as cameras do
for ``rtsp_transport=tcp``), prints ``ready PORT`` on stdout once it accepts connections, and stops on
SIGTERM/SIGINT. ``--port`` 0 picks a free port; pass that port again to restart the "camera" in place.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def pipeline(width: int, height: int, fps: int) -> str:
    """A live test pattern, H.264 with a keyframe every second, payloaded as pay0."""
    return (f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
            f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
            f"! rtph264pay name=pay0 pt=96 config-interval=1 )")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="/cam")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--fps", type=int, default=10)
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(pipeline(args.width, args.height, args.fps))
    factory.set_shared(True)
    factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        sys.exit(f"rtsp_server: cannot listen on 127.0.0.1:{args.port}")

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"ready {server.get_bound_port()}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
