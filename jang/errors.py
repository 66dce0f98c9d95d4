"""The errors JANG raises. Every message names the file or tensor and the problem."""


class JangError(Exception):
    """Base class: catch this to handle any JANG failure."""


class ModelNotFoundError(JangError, FileNotFoundError):
    """A path that does not exist, or is not a model folder/file."""


class UnknownProfileError(JangError, ValueError):
    """A profile name that is not one of the published ones."""


class UnsupportedArchitectureError(JangError, ValueError):
    """A model_type that mlx-lm (or JANG's GGUF importer) does not know."""


class CorruptShardError(JangError):
    """A safetensors shard that is truncated or whose header cannot be read."""


class HeaderMismatchError(JangError):
    """Per-tensor records in shard headers disagree with config.json."""


class NonFiniteWeightError(JangError, ValueError):
    """A source weight holds NaN or infinity."""


class OutputExistsError(JangError, FileExistsError):
    """The output folder exists and --force was not given."""


class DownloadError(JangError):
    """A model or data package could not be fetched."""


class SourceReadError(JangError):
    """A source tensor could not be read (file truncated, moved, I/O error); names the file."""


class WriteError(JangError, OSError):
    """Writing the output failed (disk full, permissions); names the file. The partial
    folder is kept so ``--resume`` can continue once the problem is fixed."""
