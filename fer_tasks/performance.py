"""Runtime settings that decide training speed: numeric precision and TensorFlow threads.

Precision: Keras' "mixed_bfloat16" policy computes in bfloat16 and keeps the
weights in float32. `precision="auto"` picks it only where the CPU flags show
native bfloat16 instructions (AVX-512 BF16 or AMX), because elsewhere TensorFlow
emulates bfloat16 in software. NOTE: the emulated case is expected to train
slower than float32 but was not measured here, because the benchmark machine
has avx512_bf16.

Threads: several training tasks share one machine's cores (the Airflow pool
`training` runs up to `FER_TRAINING_POOL_SLOTS` of them at once). Each task gets
`max(1, cores // parallel_tasks)` intra-op and inter-op threads, where
`parallel_tasks` is the smaller of the pool slots and the number of models the run
trains. Without this each task starts one thread per core, so three tasks on two
cores run six busy threads.

This module imports Keras and TensorFlow only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fer_tasks.config import PRECISIONS

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags of the x86 instructions that compute bfloat16 natively.
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
DEFAULT_POOL_SLOTS = 3


@dataclass(frozen=True)
class Precision:
    """The precision a training uses, with the Keras dtype policy and why it was chosen."""

    name: str  # "bfloat16" or "float32"
    policy: str  # Keras dtype policy: "mixed_bfloat16" or "float32"
    reason: str


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """Return the CPU feature flags from /proc/cpuinfo, or an empty set where it is unreadable."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bfloat16_flags(flags: frozenset[str] | None = None) -> list[str]:
    """Return the native bfloat16 flags this CPU has (empty on CPUs that would emulate it)."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in NATIVE_BFLOAT16_FLAGS if flag in flags]


def resolve_precision(requested: str, flags: frozenset[str] | None = None) -> Precision:
    """Turn the `precision` setting (auto, bfloat16 or float32) into the precision to train in.

    Raises:
        ValueError: `requested` is not one of `PRECISIONS`.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {requested!r}")
    native = native_bfloat16_flags(flags)
    if requested == "float32":
        return Precision("float32", "float32", "float32 was requested")
    if requested == "bfloat16":
        if native:
            return Precision("bfloat16", "mixed_bfloat16", f"bfloat16 was requested; the CPU has {', '.join(native)}")
        return Precision(
            "bfloat16",
            "mixed_bfloat16",
            "bfloat16 was requested, but the CPU has neither avx512_bf16 nor amx_bf16, so "
            "TensorFlow emulates it in software, which is expected to train slower than float32",
        )
    if native:
        return Precision("bfloat16", "mixed_bfloat16", f"auto: the CPU has {', '.join(native)}")
    return Precision(
        "float32",
        "float32",
        "auto: the CPU has neither avx512_bf16 nor amx_bf16, so bfloat16 would be emulated "
        "in software",
    )


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Build Keras models under `policy` inside the block; restore the previous global policy after."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def available_cores() -> int:
    """Return the number of cores this process may run on (its CPU affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pool_slots() -> int:
    """Return the training pool's slots from `FER_TRAINING_POOL_SLOTS` (default 3).

    Raises:
        ValueError: the variable is set but not a whole number of at least 1.
    """
    value = os.environ.get("FER_TRAINING_POOL_SLOTS", "").strip() or str(DEFAULT_POOL_SLOTS)
    try:
        slots = int(value)
    except ValueError:
        slots = 0
    if slots < 1:
        raise ValueError(f"FER_TRAINING_POOL_SLOTS must be a whole number of at least 1, got {value!r}")
    return slots


def thread_counts(parallel_tasks: int, cores: int) -> tuple[int, int]:
    """Return (intra-op, inter-op) threads for one of `parallel_tasks` trainings sharing `cores`."""
    if parallel_tasks < 1 or cores < 1:
        raise ValueError(f"parallel_tasks and cores must be at least 1, got {parallel_tasks} and {cores}")
    share = max(1, cores // parallel_tasks)
    return share, share


def training_threads(models: int) -> tuple[int, int]:
    """Return (intra-op, inter-op) threads for one training task of a run that trains `models` models.

    `FER_TF_INTRA_OP_THREADS` and `FER_TF_INTER_OP_THREADS`, when set to a value
    above 0, replace the derived counts.
    """
    parallel = max(1, min(pool_slots(), models))
    intra, inter = thread_counts(parallel, available_cores())
    intra = _positive_env("FER_TF_INTRA_OP_THREADS") or intra
    inter = _positive_env("FER_TF_INTER_OP_THREADS") or inter
    return intra, inter


def _positive_env(name: str) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return 0
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number (0 derives it from the cores), got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be 0 or more, got {value!r}")
    return number
