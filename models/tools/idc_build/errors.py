"""The build's named errors: what stops a build, by cause."""
from __future__ import annotations


class BuildError(Exception):
    """A build step cannot go on; the message says what was wrong."""


class BuildInputError(BuildError, ValueError):
    """The data, a reused build or a step's input does not fit this build."""


class BuildCheckError(BuildError):
    """A check on what the build made failed: an exported graph does not compute what its module computes, or
    a model gives probabilities outside [0, 1]."""
