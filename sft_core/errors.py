"""One exception class per failure kind. Messages name the file/row/column or setting at fault."""


class SftError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""

    exit_code = 1


class ConfigError(SftError):
    """A config key is unknown, has the wrong type, or an impossible value."""

    exit_code = 2


class DataSourceError(SftError):
    """The dataset cannot be fetched (network, unknown id, missing file)."""

    exit_code = 3

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient  # a network failure may pass on a retry; a missing local file will not


class DataFormatError(SftError):
    """A dataset file cannot be parsed into rows (bad JSON, encoding, binary, empty...)."""

    exit_code = 3


class DataValidationError(SftError):
    """Rows were read but break the expectation suite (policy `fail`)."""

    exit_code = 4


class ModelSourceError(SftError):
    """The base model cannot be found or loaded."""

    exit_code = 5

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient  # only a download that failed on the network may pass on a retry


class NonFiniteError(SftError):
    """Training produced a loss, or a model holds weights, that are NaN or infinite: it stops and is never registered.
    Exit 5, the model's code: the model being trained is what went wrong (or the rate that trains it)."""

    exit_code = 5


class TrackingError(SftError):
    """The MLflow tracking server is unreachable or refuses us."""

    exit_code = 6


class PromotionError(SftError):
    """The promotion gate refused a candidate, or the alias to move does not exist."""

    exit_code = 7


class OrchestrationError(SftError):
    """The Prefect API is not configured or does not answer, or a deployment cannot be registered."""

    exit_code = 8


class StorageError(SftError):
    """The disk is full (or would be): the message names the folder, what is free and what the stage needs."""

    exit_code = 9


class EngineError(SftError):
    """The generation engine cannot run: vLLM missing or broken, its memory reservation refused, the model
    shape unsupported. The message says what to do (a make target, an option)."""

    exit_code = 10
