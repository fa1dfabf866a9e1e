"""Exception hierarchy, and the one table that maps every NVML return code to a class.

``LlmDvfsError`` is the root. ``NvmlError`` carries ``code`` (the NVML return value), ``code_name``
(e.g. ``NVML_ERROR_NO_PERMISSION``) and ``function`` (the NVML function that returned it).
The native core raises these through :func:`from_nvml`, so every NVML failure reaching Python has
a class that callers can catch precisely.
"""
from __future__ import annotations


class LlmDvfsError(Exception):
    """Base class of every error raised by llm_dvfs."""


class ConfigError(LlmDvfsError, ValueError):
    """Invalid user input (config file, CLI flag, model or task name); raised before GPU work."""


class DataNotFound(LlmDvfsError, FileNotFoundError):
    """A dataset, tokenizer, model or nltk resource is missing; the message says how to get it."""


class ClockChangeNotAllowed(LlmDvfsError, PermissionError):
    """A clock or power-limit change was requested without the explicit opt-in."""


class LibraryNotFound(LlmDvfsError):
    """The NVML (or CUDA driver) shared library could not be loaded."""


class SymbolNotFound(LlmDvfsError):
    """The loaded library lacks a symbol llm_dvfs requires (driver too old?)."""


class CudaError(LlmDvfsError):
    """A CUDA driver call failed.

    Attributes:
        code: the ``CUresult`` value (int).
        code_name: e.g. ``CUDA_ERROR_INVALID_CONTEXT`` ("" when the driver cannot name it).
        function: the driver function, e.g. ``cuEventRecord``.
    """

    def __init__(self, code: int, function: str, code_name: str = "", message: str = "") -> None:
        self.code = int(code)
        self.function = function
        self.code_name = code_name
        super().__init__(message or f"{function} failed: {code_name or 'CUDA error'} ({code})")

    def __reduce__(self):
        return (type(self), (self.code, self.function, self.code_name, self.args[0] if self.args else ""))


class NvmlError(LlmDvfsError):
    """An NVML call failed.

    Attributes:
        code: the NVML return code (int).
        code_name: its symbolic name, e.g. ``NVML_ERROR_NOT_SUPPORTED``.
        function: the NVML function that returned it, e.g. ``nvmlDeviceGetSamples``.
    """

    def __init__(self, code: int, function: str, message: str = "") -> None:
        self.code = int(code)
        self.code_name = NVML_CODE_NAMES.get(self.code, f"NVML_ERROR_{self.code}")
        self.function = function
        text = f"{function} failed: {self.code_name} ({self.code})"
        if message:
            text += f": {message}"
        super().__init__(text)

    def __reduce__(self):  # keep code/function across pickling (multiprocessing, watchdog)
        return (type(self), (self.code, self.function, self.args[0].split(": ", 2)[-1] if self.args else ""))


class Uninitialized(NvmlError): pass
class InvalidArgument(NvmlError, ValueError): pass
class NotSupported(NvmlError): pass
class NoPermission(NvmlError, PermissionError): pass
class AlreadyInitialized(NvmlError): pass
class NotFound(NvmlError): pass
class InsufficientSize(NvmlError): pass
class InsufficientPower(NvmlError): pass
class DriverNotLoaded(NvmlError): pass
class Timeout(NvmlError, TimeoutError): pass
class IrqIssue(NvmlError): pass
class NvmlLibraryNotFound(NvmlError): pass
class FunctionNotFound(NvmlError): pass
class CorruptedInforom(NvmlError): pass
class GpuLost(NvmlError): pass
class ResetRequired(NvmlError): pass
class OperatingSystemError(NvmlError): pass
class LibRmVersionMismatch(NvmlError): pass
class InUse(NvmlError): pass
class OutOfMemory(NvmlError, MemoryError): pass
class NoData(NvmlError): pass
class VgpuEccNotSupported(NvmlError): pass
class InsufficientResources(NvmlError): pass
class FreqNotSupported(NvmlError): pass
class ArgumentVersionMismatch(NvmlError): pass
class Deprecated(NvmlError): pass
class NotReady(NvmlError): pass
class GpuNotFound(NvmlError): pass
class InvalidState(NvmlError): pass
class Unknown(NvmlError): pass


# code -> (name, class). The single source of truth for NVML return codes in Python.
NVML_CODES: dict[int, tuple[str, type[NvmlError]]] = {
    1: ("NVML_ERROR_UNINITIALIZED", Uninitialized),
    2: ("NVML_ERROR_INVALID_ARGUMENT", InvalidArgument),
    3: ("NVML_ERROR_NOT_SUPPORTED", NotSupported),
    4: ("NVML_ERROR_NO_PERMISSION", NoPermission),
    5: ("NVML_ERROR_ALREADY_INITIALIZED", AlreadyInitialized),
    6: ("NVML_ERROR_NOT_FOUND", NotFound),
    7: ("NVML_ERROR_INSUFFICIENT_SIZE", InsufficientSize),
    8: ("NVML_ERROR_INSUFFICIENT_POWER", InsufficientPower),
    9: ("NVML_ERROR_DRIVER_NOT_LOADED", DriverNotLoaded),
    10: ("NVML_ERROR_TIMEOUT", Timeout),
    11: ("NVML_ERROR_IRQ_ISSUE", IrqIssue),
    12: ("NVML_ERROR_LIBRARY_NOT_FOUND", NvmlLibraryNotFound),
    13: ("NVML_ERROR_FUNCTION_NOT_FOUND", FunctionNotFound),
    14: ("NVML_ERROR_CORRUPTED_INFOROM", CorruptedInforom),
    15: ("NVML_ERROR_GPU_IS_LOST", GpuLost),
    16: ("NVML_ERROR_RESET_REQUIRED", ResetRequired),
    17: ("NVML_ERROR_OPERATING_SYSTEM", OperatingSystemError),
    18: ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", LibRmVersionMismatch),
    19: ("NVML_ERROR_IN_USE", InUse),
    20: ("NVML_ERROR_MEMORY", OutOfMemory),
    21: ("NVML_ERROR_NO_DATA", NoData),
    22: ("NVML_ERROR_VGPU_ECC_NOT_SUPPORTED", VgpuEccNotSupported),
    23: ("NVML_ERROR_INSUFFICIENT_RESOURCES", InsufficientResources),
    24: ("NVML_ERROR_FREQ_NOT_SUPPORTED", FreqNotSupported),
    25: ("NVML_ERROR_ARGUMENT_VERSION_MISMATCH", ArgumentVersionMismatch),
    26: ("NVML_ERROR_DEPRECATED", Deprecated),
    27: ("NVML_ERROR_NOT_READY", NotReady),
    28: ("NVML_ERROR_GPU_NOT_FOUND", GpuNotFound),
    29: ("NVML_ERROR_INVALID_STATE", InvalidState),
    999: ("NVML_ERROR_UNKNOWN", Unknown),
}
NVML_CODE_NAMES: dict[int, str] = {code: name for code, (name, _) in NVML_CODES.items()}

_NO_PERMISSION_HINT = (
    "changing clocks or power limits needs root (or CAP_SYS_ADMIN), or an administrator's "
    "`nvidia-smi -acp UNRESTRICTED` for applications clocks; run as root or ask the GPU's admin"
)


def from_nvml(code: int, function: str, message: str = "") -> NvmlError:
    """The exception instance for NVML return ``code`` from ``function``.

    Unknown codes become :class:`Unknown` with the number kept in ``code``.
    """
    _, cls = NVML_CODES.get(int(code), (None, Unknown))
    if cls is NoPermission and not message:
        message = _NO_PERMISSION_HINT
    return cls(code, function, message)
