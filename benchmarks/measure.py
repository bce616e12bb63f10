"""Measuring: alternating timings, FLOP counts, peak memory of a call, text-encoder calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Repeated measurements of one side (seconds, bytes, ...); for timings also the CPU time of
    this process (all its threads) or of the subprocess, which load from other work on a shared
    machine disturbs far less than the wall time."""

    values: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def low(self) -> float:
        return float(min(self.values))

    @property
    def high(self) -> float:
        return float(max(self.values))

    def to_dict(self) -> dict:
        data = {"median": self.median, "min": self.low, "max": self.high, "samples": list(self.values)}
        if self.cpu:
            data["cpu_median"] = float(statistics.median(self.cpu))
            data["cpu_samples"] = list(self.cpu)
        return data


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    return timed_cpu(fn, device)[0]


def timed_cpu(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    synchronize(device)
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - started, time.process_time() - cpu


def alternate(stc: Callable[[], object], baseline: Callable[[], object], repeats: int, device: str,
              log: Callable[[str], None] | None = None, label: str = "") -> tuple[Samples, Samples]:
    """Time ``stc`` and ``baseline`` ``repeats`` times each, alternating the two sides and their
    order (stc first on even rounds, the baseline first on odd ones)."""
    stc_times, base_times = Samples(), Samples()
    for index in range(repeats):
        order = [("stc", stc, stc_times), ("baseline", baseline, base_times)]
        if index % 2:
            order.reverse()
        for side, fn, samples in order:
            seconds, cpu = timed_cpu(fn, device)
            samples.values.append(seconds)
            samples.cpu.append(cpu)
            if log:
                log(f"  {label} {side} #{index + 1}: {seconds:.3f} s (CPU {cpu:.3f} s)")
    return stc_times, base_times


# --------------------------------------------------------------------------- FLOPs


def _cpu_flash_mapping() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter does not know
    (without them every SDPA call on the CPU would count 0)."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {}

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


@dataclass
class FlopCount:
    total: int = 0
    by_module: dict = field(default_factory=dict)  # top-level module -> FLOPs

    def to_dict(self) -> dict:
        return {"total": self.total, "by_module": dict(self.by_module)}


@contextmanager
def count_flops(result: FlopCount, modules: dict | None = None):
    """Count the FLOPs of the block (matmuls, convolutions, attention) into ``result``;
    ``modules`` (label -> nn.Module) get their own sub-totals, counted with hooks."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_flash_mapping())
    handles, starts = [], {}
    for label, module in (modules or {}).items():
        result.by_module.setdefault(label, 0)

        def pre(_module, _args, label=label):
            starts.setdefault(label, []).append(counter.get_total_flops())

        def post(_module, _args, _output, label=label):
            result.by_module[label] += counter.get_total_flops() - starts[label].pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with counter:
            yield result
    finally:
        for handle in handles:
            handle.remove()
    result.total = int(counter.get_total_flops())
    forward_only = sum(result.by_module.values())
    result.by_module["other (backward, optimizer, ...)"] = result.total - forward_only


# --------------------------------------------------------------------------- memory


@contextmanager
def peak_memory(result: dict, device: str):
    """Peak memory of the block above the level before it, in bytes, into ``result["peak"]``.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the tensor allocations and frees that torch's
    profiler records (``profile_memory``), summed in time order: what the tensors of the block
    need, independent of how the C allocator caches freed pages (an RSS delta is not).
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak"] = int(torch.cuda.max_memory_allocated() - before)
        result["total_peak"] = int(torch.cuda.max_memory_allocated())  # the weights included
        result["method"] = "torch.cuda.max_memory_allocated"
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    result["peak"] = int(peak)
    result["retained"] = int(current)
    result["method"] = "torch.profiler memory events (tensor allocations)"


# --------------------------------------------------------------------------- text encoder


def text_transformer_stack(text_encoder):
    """The text encoder's transformer (the stack of layers) whose calls figure 2 counts."""
    transformer = getattr(text_encoder, "text_model", text_encoder)
    return transformer.encoder


def text_modules(pipeline) -> dict:
    """The text encoders' transformer stacks, labelled for FLOP counts (SDXL: both)."""
    second = getattr(pipeline, "text_encoder_2", None)
    modules = {"text encoder": text_transformer_stack(pipeline.text_encoder)}
    if second is not None:
        modules["text encoder 2"] = text_transformer_stack(second)
    return modules


@contextmanager
def count_calls(module, result: dict, key: str = "calls"):
    result[key] = 0

    def hook(_module, _args):
        result[key] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield result
    finally:
        handle.remove()


@contextmanager
def instrumented(device: str, text_encoder=None, modules: dict | None = None, flops: bool = True,
                 memory: bool = False):
    """Everything a warm-up run measures at once: FLOPs, peak memory, text-encoder calls."""
    record = {"flops": FlopCount(), "memory": {}, "calls": {}}
    with (count_flops(record["flops"], modules) if flops else nullcontext()), \
            (peak_memory(record["memory"], device) if memory else nullcontext()), \
            (count_calls(text_transformer_stack(text_encoder), record["calls"]) if text_encoder is not None
             else nullcontext()):
        yield record


# --------------------------------------------------------------------------- module times


class ModuleTimer:
    """Wall time spent inside given modules' forward calls (hooks; outermost calls only)."""

    def __init__(self, modules: dict, device: str):
        self.modules, self.device = modules, device
        self.totals: dict[str, float] = {}

    @contextmanager
    def session(self):
        totals = {label: 0.0 for label in self.modules}
        depth = {label: 0 for label in self.modules}
        starts: dict[str, float] = {}
        handles = []
        for label, module in self.modules.items():

            def pre(_module, _args, label=label):
                if depth[label] == 0:
                    synchronize(self.device)
                    starts[label] = time.perf_counter()
                depth[label] += 1

            def post(_module, _args, _output, label=label):
                depth[label] -= 1
                if depth[label] == 0:
                    synchronize(self.device)
                    totals[label] += time.perf_counter() - starts[label]

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        try:
            yield totals
        finally:
            for handle in handles:
                handle.remove()
