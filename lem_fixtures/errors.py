"""Exceptions of the suite. Every message names the file, line or key at fault and what to do next."""


class LemError(Exception):
    """Base class: the CLI prints the message and exits 1."""


class ProbeFileError(LemError):
    """A probe file that cannot be read or has an unusable structure."""


class DuplicateProbeIdError(ProbeFileError):
    """Two probes whose ids, or whose test ids, are the same."""


class KernelError(LemError):
    """A kernel spec or file that is missing, empty or unreadable."""


class KernelDroppedError(KernelError):
    """A chat template that renders a kernel condition identically to the baseline."""


class ResultFileError(LemError):
    """An A/B result file that cannot be read."""


class ModelError(LemError):
    """A model that cannot be resolved, converted or loaded."""


class ModelNotAvailableError(ModelError):
    """A model that is not available offline; the message gives the download command."""


class BackendError(LemError):
    """mlx, or its CPU backend, is missing or broken."""


class TrainingDataError(LemError):
    """Training data that fails validation."""


class TrainingConfigError(LemError):
    """A training config file that is missing, unreadable or has an unknown key or a bad value."""


class ExpectationError(LemError):
    """A recorded-baseline file that cannot be read."""
