"""runs stage: the runs under the output root, listed (flare_exp/catalog.py) or compared
(flare_exp/runs_compare.py); a view, no run dir."""
from __future__ import annotations

from pathlib import Path

from flare_exp.catalog import listing
from flare_exp.run.stage import Stage
from flare_exp.runs_compare import comparison, listed_disagreement

STAGE = Stage(
    name="runs",
    help="the runs under paths.output_root listed (runs.compare=[a,b]: side by side, with significance)",
    record="none",
    reads_doc="`paths.output_root` (`runs.compare`)",
    writes_doc="nothing: prints the runs table, or the comparison",
)


def remove_view_dir() -> None:
    """Hydra makes a run dir for every launch; this view's holds only its empty log: it goes again, so that
    listing runs adds none."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    made = Path(HydraConfig.get().runtime.output_dir)
    if made.is_dir() and all(p.suffix == ".log" for p in made.iterdir()):  # its own log only: nothing of a run
        shutil.rmtree(made)
        try:
            made.parent.rmdir()  # flare-exp-views/ (conf/stage/runs.yaml), when this launch's dir was all it held
        except OSError:
            pass


def run(cfg, out_dir: Path | None = None) -> dict:
    from flare_exp.reports.tables import md_table
    from flare_exp.runtime import abspath

    root = abspath(cfg.paths.output_root)
    names = list(cfg.runs.compare or [])
    try:
        if names:
            sig = cfg.eval.significance
            lines = comparison(root, names, sig.resamples, sig.seed, sig.ar_trials, sig.correction)
        else:
            header, rows = listing(root, lambda run_dir: listed_disagreement(run_dir, root))
            lines = md_table(header, rows) if rows else [f"no runs under {root}"]
    finally:
        remove_view_dir()
    print("\n".join(lines), flush=True)
    return {"output_root": str(root), "lines": len(lines)}
