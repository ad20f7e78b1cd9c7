"""Thread and device policy.

On a small shared CPU machine, torch with two busy threads and any other load slows down
5-15x, so we default to one intra-op thread unless the machine is idle. Nothing here assumes
CUDA: the device is chosen at run time (``MECHUNLEARN_DEVICE`` or the best available).
"""

from __future__ import annotations

import os

import torch

from mechunlearn.errors import ConfigError

THREADS_ENV = "MECHUNLEARN_THREADS"
DEVICE_ENV = "MECHUNLEARN_DEVICE"

_configured = False


def machine_is_idle(threshold: float = 0.5) -> bool:
    """True when the 1-minute load average is below ``threshold`` runnable processes."""
    try:
        return os.getloadavg()[0] < threshold
    except OSError:  # pragma: no cover - platforms without getloadavg
        return False


def choose_thread_count() -> int:
    """Threads to use: ``MECHUNLEARN_THREADS`` if set, else all cores when idle, else 1."""
    requested = os.environ.get(THREADS_ENV)
    if requested:
        try:
            value = int(requested)
        except ValueError:
            raise ValueError(
                f"{THREADS_ENV} must be a positive integer, got {requested!r}"
            ) from None
        if value < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {requested!r}")
        return value
    cores = os.cpu_count() or 1
    return cores if machine_is_idle() else 1


def configure_threads(force: bool = False) -> int:
    """Apply the thread policy once per process (call before heavy torch work)."""
    global _configured
    if _configured and not force:
        return torch.get_num_threads()
    threads = choose_thread_count()
    torch.set_num_threads(threads)
    _configured = True
    return threads


def checked_device(name: str, source: str = "--device") -> torch.device:
    """``name`` as a torch device that exists on this machine, or a ``ConfigError`` saying
    why not (an unknown name, a CUDA device on a build or machine without one)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"{source}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA"
                if torch.version.cuda is None
                else "no GPU is visible"
            )
            raise ConfigError(f"{source}: device {name!r} is not available here ({why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{source}: device {name!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{source}: device {name!r} (Apple MPS) is not available here")
    elif device.type != "cpu":
        raise ConfigError(f"{source}: device {name!r} is not supported; use cpu, cuda or mps")
    return device


def default_device() -> torch.device:
    """``MECHUNLEARN_DEVICE`` if set, else CUDA, then MPS, then CPU."""
    requested = os.environ.get(DEVICE_ENV)
    if requested:
        return checked_device(requested, source=DEVICE_ENV)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: ``None`` / ``"auto"`` pick the best available, a name is
    checked (see :func:`checked_device`)."""
    if device in (None, "auto"):
        return default_device()
    if isinstance(device, torch.device):
        return device
    return checked_device(device)
