"""torch.profiler over a few training steps or one inference batch: the top GPU and CPU ops, headed by GPU
kernel time against wall time (how busy the GPU was)."""
from __future__ import annotations

import time
from pathlib import Path


def write_profile(path: Path, prof, wall: float, what: str) -> None:
    """The top ops by GPU and by CPU time, headed by kernel time vs wall time (how busy the GPU was)."""
    import torch

    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events  # kernel rows only, not the ops launching them
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{what}: wall {wall:.3f} s, GPU kernels {device_us / 1e6:.3f} s (busy "
                    f"{device_us / 1e6 / wall:.0%})\n\n" + events.table(sort_by="self_device_time_total", row_limit=25)
                    + "\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=15))


PROFILE_FIRST, PROFILE_STEPS = 5, 2  # steps 6 and 7 (global_step counts finished steps)


def profile_steps(out: Path, name: str, first: int = PROFILE_FIRST, steps: int = PROFILE_STEPS):
    """A callback that runs torch.profiler over `steps` training steps and writes the top CUDA and CPU ops."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == first and self.prof is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == first + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                write_profile(out / f"profile-{name}.txt", self.prof, wall, f"{steps} steps")
                self.prof = None

    return Profile()
