"""Exception classes shared by every part of musc-edge.

A :class:`MuscEdgeError` is a *user* error (bad input, bad model file, bad flags): the CLI prints
its message on one line and exits with code 2, never with a traceback. Anything else that escapes
is an internal error (exit 1).
"""

from __future__ import annotations


class MuscEdgeError(Exception):
    """A problem the user can fix; the message must say what is wrong and how to fix it."""


class InputError(MuscEdgeError):
    """Bad input data: tokens, images, folders, arguments."""


class ImageDecodeError(InputError):
    """One image could not be read (corrupt, truncated, not an image). Batch tools skip it."""


class ModelError(MuscEdgeError):
    """A model file that cannot be used: missing metadata, wrong format, unknown backbone."""


class StateError(MuscEdgeError):
    """Saved daemon state that does not fit the current model or settings."""


class DeviceError(MuscEdgeError):
    """A requested device/backend that is not available here."""
