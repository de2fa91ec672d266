"""Pure models: DeepLabV2 backbones, the ACCEL wrapper, flow warping, flow providers, checkpoint I/O.

The package imports nothing itself, so its torch-free modules (``config``, ``classes``, ``atomic``)
can be used by the service's torch-free processes and by the CLI's argument parsers.
"""
