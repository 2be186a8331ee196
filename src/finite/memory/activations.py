"""How much memory a forward pass keeps alive for the backward, and which module keeps it.

Every tensor autograd saves for the backward passes through the pack hook of
:func:`torch.autograd.graph.saved_tensors_hooks`; module forward hooks keep a stack of the
modules being run, so the top of the stack is the innermost module that saved it. Bytes are
counted per *storage*: a view, a transpose or a tensor saved by two ops keeps one block of
memory alive, and is counted once, for the first module that saved it.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

__all__ = ["ActivationReport", "SavedStorage", "activation_memory"]


@dataclass(frozen=True)
class SavedStorage:
    """One block of memory that the autograd graph keeps alive for the backward.

    Attributes
    ----------
    module : str
        Path (as in :meth:`torch.nn.Module.named_modules`, ``""`` for the model itself)
        of the innermost module whose forward saved it first.
    nbytes : int
        Size of the whole storage, which is what stays allocated even when only a view of
        it was saved.
    dtype : torch.dtype
        Dtype of the first tensor saved from this storage.
    shape : tuple of int
        Shape of the first tensor saved from this storage.
    device : str
        Device of the storage.
    saves : int
        How many times a tensor on this storage was saved (views and repeats included).
    """

    module: str
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str
    saves: int


@dataclass(frozen=True)
class ActivationReport:
    """Memory saved for the backward by one forward pass (see :func:`activation_memory`).

    Attributes
    ----------
    total_bytes : int
        Bytes of every distinct storage saved for the backward, parameters and buffers of
        the model excluded (they are allocated whether or not a graph exists). The model's
        inputs count when an op saves them: the graph keeps them alive.
    by_module : Mapping[str, int]
        Module path -> bytes first saved inside that module's own forward, children
        excluded (see :meth:`inclusive_bytes`); only modules that saved something appear.
    module_types : Mapping[str, str]
        Module path -> class name, for every module of the model.
    storages : tuple of SavedStorage
        One entry per counted storage, in the order they were first saved.
    parameter_bytes : int
        Bytes of the parameters and buffers that the graph also saved (not in
        ``total_bytes``).
    device_allocated_bytes : int or None
        CUDA only: growth of ``torch.cuda.memory_allocated`` over the forward, with its
        output still held. It also counts the output and any tensor the forward kept
        without saving it, and it does not count inputs that existed before.
    device_peak_bytes : int or None
        CUDA only: ``torch.cuda.max_memory_allocated`` during the forward minus the
        allocation before it (temporaries included).
    """

    total_bytes: int
    by_module: Mapping[str, int]
    module_types: Mapping[str, str]
    storages: tuple[SavedStorage, ...]
    parameter_bytes: int
    device_allocated_bytes: int | None = None
    device_peak_bytes: int | None = None

    def inclusive_bytes(self, path: str) -> int:
        """Bytes first saved inside the module at ``path`` or any of its descendants."""
        if path not in self.module_types:
            raise ValueError(f"path {path!r} names no module of the model")
        return sum(
            nbytes
            for module, nbytes in self.by_module.items()
            if path == "" or module == path or module.startswith(path + ".")
        )

    @property
    def device_agreement(self) -> float | None:
        """``device_allocated_bytes / total_bytes`` on CUDA (1.0 is perfect), else None."""
        if self.device_allocated_bytes is None or self.total_bytes == 0:
            return None
        return self.device_allocated_bytes / self.total_bytes


def activation_memory(model: nn.Module, *args: Any, **kwargs: Any) -> ActivationReport:
    """Measure the memory one forward pass of ``model`` saves for its backward.

    Runs ``model(*args, **kwargs)`` once with gradients enabled, records every tensor that
    autograd saves (through :func:`torch.autograd.graph.saved_tensors_hooks`) and
    attributes it to the innermost module running at that moment (through module forward
    hooks). Each storage is counted once, however many views of it are saved. Parameters
    and buffers are reported apart, not as activations.

    The model's buffers (e.g. batch-norm running statistics) and the global random number
    generators are left as they were, so measuring does not perturb training. On CUDA the
    peak-memory statistics of the device are reset.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in the mode (``train()``/``eval()``) to measure.
    *args, **kwargs
        Its inputs.

    Returns
    -------
    ActivationReport
        ``total_bytes``, ``by_module`` and the list of saved storages. A storage saved,
        then released before the forward returns (a graph branch whose result is
        dropped) is not counted.

    Raises
    ------
    TypeError
        If ``model`` is not a :class:`torch.nn.Module`.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Sigmoid())
    >>> report = activation_memory(model, torch.randn(4, 8))
    >>> report.total_bytes  # the Linear keeps its input, the Sigmoid its output
    384
    >>> dict(report.by_module)
    {'0': 128, '1': 256}
    """
    _require_module(model)
    recorder = _SavedTensorRecorder(model)
    devices = _cuda_devices(model, args, kwargs)
    with _preserved_state(model, devices), torch.enable_grad():
        before = _cuda_allocated(devices, reset_peak=True)
        with recorder.recording():
            output = model(*args, **kwargs)
        allocated = _cuda_allocated(devices) if devices else None
        peak = _cuda_peak(devices) if devices else None
        report = recorder.report(
            device_allocated_bytes=None if allocated is None else allocated - before,
            device_peak_bytes=None if peak is None else peak - before,
        )
        del output
    return report


# --------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------


@dataclass
class _Saved:
    tensor: weakref.ref
    key: tuple[str, int]
    nbytes: int
    module: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str


class _SavedTensorRecorder:
    """Saved-tensor pack hook plus a stack of running modules."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.paths = {module: path for path, module in model.named_modules()}
        self.types = {path: type(module).__name__ for module, path in self.paths.items()}
        self.stack: list[str] = []
        self.saved: list[_Saved] = []
        self.parameter_keys = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        for module, path in self.paths.items():
            handles.append(module.register_forward_pre_hook(self._enter(path)))
            handles.append(module.register_forward_hook(self._leave, always_call=True))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self.stack.clear()

    def _enter(self, path: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(path)

        return hook

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(tensor)
        # A detached alias: returning ``tensor`` itself would make a saved output hold
        # its own grad_fn (a reference cycle that outlives the forward). The graph is
        # only measured, never run backward, so nothing needs the autograd history.
        packed = tensor.detach()
        self.saved.append(
            _Saved(
                tensor=weakref.ref(packed),
                key=key,
                nbytes=nbytes,
                module=self.stack[-1] if self.stack else "",
                dtype=tensor.dtype,
                shape=tuple(tensor.shape),
                device=str(tensor.device),
            )
        )
        # The graph keeps the returned object, so the weak reference above dies exactly
        # when the part of the graph that saved it is released.
        return packed

    def report(
        self, device_allocated_bytes: int | None, device_peak_bytes: int | None
    ) -> ActivationReport:
        first: dict[tuple[str, int], _Saved] = {}
        saves: dict[tuple[str, int], int] = {}
        parameter_bytes = 0
        counted_parameters: set[tuple[str, int]] = set()
        for saved in self.saved:
            if saved.tensor() is None:
                # Released before the forward returned: its address may have been reused.
                continue
            if saved.key in self.parameter_keys:
                if saved.key not in counted_parameters:
                    counted_parameters.add(saved.key)
                    parameter_bytes += saved.nbytes
                continue
            saves[saved.key] = saves.get(saved.key, 0) + 1
            first.setdefault(saved.key, saved)
        storages = tuple(
            SavedStorage(
                module=s.module,
                nbytes=s.nbytes,
                dtype=s.dtype,
                shape=s.shape,
                device=s.device,
                saves=saves[key],
            )
            for key, s in first.items()
        )
        by_module: dict[str, int] = {}
        for storage in storages:
            by_module[storage.module] = by_module.get(storage.module, 0) + storage.nbytes
        return ActivationReport(
            total_bytes=sum(s.nbytes for s in storages),
            by_module=MappingProxyType(by_module),
            module_types=MappingProxyType(dict(self.types)),
            storages=storages,
            parameter_bytes=parameter_bytes,
            device_allocated_bytes=device_allocated_bytes,
            device_peak_bytes=device_peak_bytes,
        )


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[tuple[str, int], int]:
    """((device, address), bytes) of the storage under ``tensor``."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        # Sparse and other storage-less layouts: count the tensor itself.
        return (str(tensor.device), -id(tensor)), tensor.numel() * tensor.element_size()
    address = storage.data_ptr()
    if address == 0:
        # Empty or meta storages share address 0: never merge them.
        return (str(tensor.device), -id(storage)), storage.nbytes()
    return (str(tensor.device), address), storage.nbytes()


# --------------------------------------------------------------------------------------
# side effects: buffers, random state, CUDA statistics
# --------------------------------------------------------------------------------------


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def _cuda_devices(model: nn.Module, args: Any, kwargs: Any) -> list[torch.device]:
    tensors = [*model.parameters(), *model.buffers(), *_tensors_in(args), *_tensors_in(kwargs)]
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


@contextlib.contextmanager
def _preserved_state(model: nn.Module, cuda_devices: list[torch.device]) -> Iterator[None]:
    """Restore the model's buffers and the CPU/CUDA random generators on exit."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[d.index or 0 for d in cuda_devices]):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _cuda_allocated(devices: list[torch.device], reset_peak: bool = False) -> int:
    total = 0
    for device in devices:
        torch.cuda.synchronize(device)
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        total += torch.cuda.memory_allocated(device)
    return total


def _cuda_peak(devices: list[torch.device]) -> int:
    total = 0
    for device in devices:
        torch.cuda.synchronize(device)
        total += torch.cuda.max_memory_allocated(device)
    return total


# --------------------------------------------------------------------------------------
# forward time per module (used by the checkpoint planner)
# --------------------------------------------------------------------------------------


def _module_forward_seconds(
    model: nn.Module,
    paths: list[str],
    args: tuple,
    kwargs: Mapping[str, Any],
    repeats: int,
) -> dict[str, float]:
    """Median wall time of each listed module's forward over ``repeats`` model forwards.

    Gradients are enabled (the recomputation in a checkpoint's backward runs with them).
    CUDA work is synchronised at each module's entry and exit; this is a planning tool, not
    a step-time path. Buffers and random state are restored as in :func:`activation_memory`.
    """
    modules = dict(model.named_modules())
    devices = _cuda_devices(model, args, kwargs)
    samples: dict[str, list[float]] = {path: [] for path in paths}
    # Per forward, the summed time of each module's calls (a shared module runs twice).
    current = dict.fromkeys(paths, 0.0)
    starts: dict[str, list[float]] = {path: [] for path in paths}

    def sync() -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    def enter(path: str) -> Callable:
        def hook(module: nn.Module, inputs: Any) -> None:
            sync()
            starts[path].append(time.perf_counter())

        return hook

    def leave(path: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            sync()
            if starts[path]:
                current[path] += time.perf_counter() - starts[path].pop()

        return hook

    handles = []
    for path in paths:
        handles.append(modules[path].register_forward_pre_hook(enter(path)))
        handles.append(modules[path].register_forward_hook(leave(path), always_call=True))
    try:
        with _preserved_state(model, devices), torch.enable_grad():
            for _ in range(repeats):
                current.update(dict.fromkeys(paths, 0.0))
                output = model(*args, **kwargs)
                del output
                for path in paths:
                    samples[path].append(current[path])
    finally:
        for handle in handles:
            handle.remove()
    return {path: _median(values) for path, values in samples.items()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return 0.5 * (ordered[middle - 1] + ordered[middle])
