"""torch.profiler over a few training steps (``sft.profile_steps`` / ``rl.profile_steps``) or one inference batch
(``infer.profile_batch``): the top GPU kernels, the ops by input shape and the top CPU ops in <run dir>/profile.txt,
headed by GPU kernel time against wall time (how busy the GPU was). How the performance doc's profiles are made."""
from __future__ import annotations

import time
from pathlib import Path

from flare_exp.profile_gaps import REGION, gap_table


def write_profile(path: Path, prof, wall: float, what: str) -> None:
    """Headed by kernel time vs wall time (how busy the GPU was): the top GPU kernels alone (the op rows that
    launch them would count their time twice), the top ops by input shape (which tensors the time went to), and
    the top ops by CPU time, and where the GPU idled with what the host ran then. A table torch cannot draw is
    replaced by why, not left to stop the run."""
    import torch
    from torch.autograd.profiler_util import EventList

    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not annotation(e)]
    device_us = sum(e.self_device_time_total for e in kernels)
    tables = [("GPU kernels" if kernels else "ops (no GPU)", lambda: EventList(kernels or events).table(
                   sort_by="self_device_time_total" if kernels else "self_cpu_time_total", row_limit=25)),
              ("ops by input shape", lambda: shape_table(prof, on_gpu=bool(kernels))),
              ("ops by CPU time", lambda: events.table(sort_by="self_cpu_time_total", row_limit=15)),
              ("GPU idle: what the host was doing", lambda: gap_table(
                  prof.events(), lambda e: e.device_type == torch.autograd.DeviceType.CUDA, annotation))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{what}: wall {wall:.3f} s, GPU kernels {device_us / 1e6:.3f} s (busy "
                    f"{device_us / 1e6 / wall:.0%})\n\n" + "\n\n".join(f"## {name}\n{drawn(table)}"
                                                                for name, table in tables))


def annotation(event) -> bool:
    """A named region on the GPU's timeline (torch.compile's "## Call CompiledFxGraph ... ##" around a compiled
    graph's kernels; our own ``region``s, mirrored there), not a kernel: counted as one, the kernels inside it
    counted twice (busy 142% on an H100)."""
    key = str(event.key)
    return bool(getattr(event, "is_user_annotation", False)) or key.startswith("## ") or key.startswith(REGION)


def drawn(table) -> str:
    try:
        return table()
    except Exception as e:  # noqa: BLE001  (torch's table code; the profile is a diagnostic of the run)
        return f"(not drawn: {type(e).__name__}: {e})"


def shape_table(prof, on_gpu: bool, rows: int = 20) -> str:
    """The ops that took the most GPU time (CPU time without a GPU), each input shape apart: its own table, as
    torch's needs the kernel rows beside the ops to compute its percentages."""
    import torch

    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type != torch.autograd.DeviceType.CUDA and e.input_shapes]
    ops.sort(key=lambda e: e.device_time_total if on_gpu else e.cpu_time_total, reverse=True)
    lines = [f"{'GPU ms':>10} {'CPU ms':>10} {'calls':>7}  op  input shapes"]
    lines += [f"{e.device_time_total / 1e3:10.2f} {e.cpu_time_total / 1e3:10.2f} {e.count:7d}  {e.key}  "
              f"{str(e.input_shapes)[:160]}" for e in ops[:rows]]
    return "\n".join(lines)


PROFILE_FIRST = 5  # profiled from the sixth step on (global_step counts finished steps): past the warm-up


class Profiled:
    """torch.profiler from ``start()`` to ``stop(path, what)``, CUDA included where there is a GPU."""

    def start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def stop(self, path: Path, what: str) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        write_profile(path, self.prof, wall, what)
        return wall


def profile_steps(path: Path, steps: int, first: int = PROFILE_FIRST):
    """A Trainer callback profiling ``steps`` training steps after the first ``first`` into ``path``."""
    from flare_exp.callback_base import TrainerCallback

    class ProfileSteps(TrainerCallback):
        running = None
        profiled_steps = range(first + 1, first + steps + 1)  # the global steps the profiler slowed

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == first and self.running is None and state.is_world_process_zero:
                self.running = Profiled()
                self.running.start()

        def on_step_end(self, args, state, control, **kw):
            if self.running is not None and state.global_step == first + steps:
                self.running.stop(path, f"{steps} steps")
                self.running = None

    return ProfileSteps()
