"""Compile once, not every run: torch's compile caches (inductor's FX-graph cache, AOT-autograd cache, the Triton
kernels) under paths.cache_dir, so a second run, trial or stage on the same node reuses what the first compiled
instead of paying the first steps' compilation again; and compiled blocks that run only in training (an
evaluation pass runs the blocks eagerly instead of recompiling them for its no-grad, eval-mode, cached calls)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from flare_exp.quiet import quiet_gpu_messages

log = logging.getLogger(__name__)

# Set unless the user set them: the directory, and the caches switched on (their default in recent torch)
CACHE_SWITCHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def use_compile_cache(cache_dir) -> Path:
    """torch's compile caches under ``cache_dir``/torch_compile (TORCHINDUCTOR_CACHE_DIR; Triton's kernels go
    below it), unless the environment already names a directory. Call before anything compiles."""
    directory = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(cache_dir) / "torch_compile").absolute()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    for key, value in CACHE_SWITCHES.items():
        os.environ.setdefault(key, value)
    # torch reads these at import; where it is imported already, its live config is told too (imported here
    # only for that, inductor's config alone costs seconds: an eval scoring a file needs neither)
    inductor_config, functorch_config = (sys.modules.get(f"torch._{m}.config") for m in ("inductor", "functorch"))
    if inductor_config is not None:
        inductor_config.fx_graph_cache = os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    if functorch_config is not None:
        functorch_config.enable_autograd_cache = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    return directory


def prepare_gpu_run(cfg) -> None:
    """A stage's setup for the GPU: the compile caches under paths.cache_dir, the GPU-only messages quiet."""
    from flare_exp.runtime import abspath

    directory = use_compile_cache(abspath(cfg.paths.cache_dir))
    log.debug("torch compile cache: %s", directory)
    quiet_gpu_messages()


def compiled_in_training_only(block) -> None:
    """``block`` (compiled with Module.compile) runs its compiled code in training mode and its eager code in
    eval mode. The training graph is guarded on grad mode and on its input requiring grad: an in-training
    evaluation (eval mode, no gradients, other batch shapes) would compile new graphs of the one code object the
    blocks share until torch's recompile limit, then run uncompiled anyway, the log full of warnings."""
    compiled = block._compiled_call_impl
    if compiled is None:
        return

    def call(*args, **kwargs):
        return compiled(*args, **kwargs) if block.training else block._call_impl(*args, **kwargs)

    block._compiled_call_impl = call
