"""Named errors shared across the appliance; each says what went wrong and how to fix it."""


class ApplianceError(Exception):
    """Base class for errors the appliance reports to a technician instead of crashing."""


class ManifestError(ApplianceError):
    """A model folder's manifest is missing, malformed or inconsistent."""


class ModelIntegrityError(ApplianceError):
    """A model file does not match the sha256 recorded in its manifest."""


class EngineError(ApplianceError):
    """An inference engine could not load a model or run a batch."""


class EngineUnavailableError(EngineError):
    """An inference runtime (OpenVINO, ONNX Runtime) cannot be imported on this machine."""


class InputError(ApplianceError):
    """An input image, tile or folder cannot be used."""


class StoreError(ApplianceError):
    """The case database could not be opened or written."""


class CaseNotFoundError(StoreError):
    """No case with that id is in the case database."""


class UserNotFoundError(StoreError):
    """No reviewer with that name."""


class CaseStateError(StoreError):
    """The case exists but is not in a state that allows the action (e.g. sign-off before the call)."""


class ConfigError(ApplianceError):
    """The settings file or environment holds an unknown key or an invalid value."""


class ApiBindError(ApplianceError):
    """The status API could not listen on its host and port (e.g. the port is in use)."""
