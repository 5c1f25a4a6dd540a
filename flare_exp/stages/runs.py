"""runs stage: the runs under the output root, listed or compared (flare_exp/catalog.py); a view, no run dir."""
from __future__ import annotations

from flare_exp.catalog import run  # noqa: F401  (the stage's work)
from flare_exp.run.stage import Stage

STAGE = Stage(
    name="runs",
    help="the runs under paths.output_root listed (runs.compare=[a,b]: side by side, with significance)",
    record="none",
    reads_doc="`paths.output_root` (`runs.compare`)",
    writes_doc="nothing: prints the runs table, or the comparison",
)
