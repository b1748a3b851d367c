"""Every error hhdata raises derives from HhDataError.

Messages say what happened, where (file, line or row id) and how to fix it.
"""

from __future__ import annotations


class HhDataError(Exception):
    """Base class of every error raised by hhdata."""


class SourceError(HhDataError, OSError):
    """An input path is missing, unreadable, or not a file hhdata can read."""


class TranscriptError(HhDataError, ValueError):
    """A transcript is not in the Human/Assistant format and cannot be parsed."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class PairError(HhDataError, ValueError):
    """A chosen/rejected pair whose prompt cannot be determined."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SchemaError(HhDataError, ValueError):
    """A table or record does not match the JSON Schema it must follow."""


class ReleaseError(HhDataError):
    """A release directory is incomplete, inconsistent, or cannot be built."""


class VersionError(ReleaseError, ValueError):
    """A version number contradicts the change it describes, or already exists."""


class IntegrityError(ReleaseError):
    """A data file's checksum or size does not match its manifest."""


class LoadError(HhDataError, ValueError):
    """A load() request names a config, split or version that its source does not have."""


class HubError(HhDataError):
    """The Hub refused a request or could not be reached."""


class SynthError(HhDataError, ValueError):
    """Settings of the synthetic generator (hhdata.synth) are out of range."""
