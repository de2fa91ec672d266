"""Server-side sources: the server pulls RTSP / HTTP(S) / file URLs, segments them and offers the results.

``policy`` (the allow-list), ``fetch`` (opening a URL through it with PyAV), ``source`` (one source's
reader and worker threads), ``feed`` (the bounded hand-offs), ``sinks`` (disk and HLS), ``manager``
(the app's sources); the routes are in ``service.routes.sources``. README: "Server-side sources".
"""
