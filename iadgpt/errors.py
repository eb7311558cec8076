"""One base exception for the project, one subclass per area.

Messages say what went wrong *and* what fixes it, because the person reading them
is usually a quality engineer at a station, not the author of the code.
"""


class IadGptError(Exception):
    """Base of every error this package raises on purpose."""


class DataError(IadGptError):
    """A dataset folder or image is missing or malformed."""


class BackboneError(IadGptError):
    """A backbone cannot be built or its weights cannot be loaded."""


class ScorerError(IadGptError):
    """A scorer is misconfigured (wrong backbone, missing references)."""


class BundleError(IadGptError):
    """A bundle is missing, corrupt, tampered with or of an unknown schema."""


class ExportError(IadGptError):
    """Export to ONNX/TensorRT failed or the exported graph disagrees with torch."""


class EngineError(IadGptError):
    """An inference engine cannot run here (backend missing, wrong GPU, wrong provider)."""


class SourceError(IadGptError):
    """A frame source cannot be opened or read."""


class ConfigError(IadGptError):
    """A station or prompt configuration file is invalid."""


class CalibrationError(IadGptError):
    """Calibration cannot produce trustworthy thresholds from the data given."""


class DescriberError(IadGptError):
    """The LLM describer failed or is not available."""
