"""Named errors shared across the appliance; each says what went wrong and how to fix it."""


class ApplianceError(Exception):
    """Base class for errors the appliance reports to a technician instead of crashing."""


class ManifestError(ApplianceError):
    """A model folder's manifest is missing, malformed or inconsistent."""


class ModelIntegrityError(ApplianceError):
    """A model file does not match the sha256 recorded in its manifest."""


class EngineError(ApplianceError):
    """An inference engine could not load a model or run a batch."""


class InputError(ApplianceError):
    """An input image, tile or folder cannot be used."""


class StoreError(ApplianceError):
    """The case database could not be opened or written."""
