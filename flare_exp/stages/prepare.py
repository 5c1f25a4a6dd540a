"""prepare stage: writes ${data.prepared_dir}/{train,val,test,rejects}.jsonl + summary.json."""
from __future__ import annotations

import logging
from pathlib import Path

from flare_exp.data.images import processor_limits
from flare_exp.data.prepare import format_summary, prepare
from flare_exp.run.stage import Stage
from flare_exp.runtime import abspath


STAGE = Stage(
    name="prepare",
    help="the raw FLARE download -> train/val/test.jsonl (validated, rejects listed)",
    reads=(),
    deciding=("data",),
    free=("data.image_workers", "data.prepared_dir"),  # the run's own dir: where it is decides nothing
    ranks="rank 0",
    pipeline_step=True,
    reads_doc="`data.root`",
    writes_doc="`data.prepared_dir/{train,val,test,rejects}.jsonl`, `summary.json`",
)

log = logging.getLogger(__name__)


def output_dir(cfg, run_dir: Path) -> Path:
    return abspath(cfg.data.prepared_dir)


def input_changes(cfg, out_dir: Path) -> list[str]:
    """What changed under data.root since the prepare in ``out_dir`` read it (a finished prepare is reused only
    without any): its question files and images."""
    from flare_exp.data.prepare import questions_read
    from flare_exp.data.question_files import question_files, resolve_image, split_sources_of
    from flare_exp.data.unzip import of_another_dataset, pending_archives, said_pending
    from flare_exp.data.prepare_inputs import INPUTS, input_changes as changes, prepared_summary, summarised

    root = abspath(cfg.data.root)
    if not root.is_dir():
        return []  # the settings' check names a missing data.root
    archives = [f"data.root file {z.relative_to(root).as_posix()}: {said_pending(refill)}"
                for z, refill in (pending_archives(root) if cfg.data.unzip else {}).items()
                if not of_another_dataset(root, z, list(cfg.data.datasets))]  # none of this prepare's data
    found = question_files(root)
    read = questions_read(found, cfg.data, split_sources_of(cfg.data))
    expected = prepared_summary(out_dir).get("inputs") == INPUTS  # this version's prepare wrote the record
    generated = cfg.data.demo is not None and root.is_relative_to(abspath(cfg.paths.cache_dir))  # our demo tree
    return summarised(archives + changes(out_dir, root, read, resolve_image, expected, quiet=generated))


def run(cfg, out_dir: Path) -> dict:
    root = abspath(cfg.data.root)
    if cfg.data.demo is not None:
        from flare_exp.fixtures.demo_data import DEMO_MARKER, generate_demo

        if (root / DEMO_MARKER).exists():
            generate_demo(root, **cfg.data.demo)  # there: its settings must be this run's (refused otherwise)
        elif not root.exists():
            if not root.is_relative_to(abspath(cfg.paths.cache_dir)):  # a root the user named: never fill it
                raise FileNotFoundError(
                    f"data.root={cfg.data.root}: no such directory ({root}). data={cfg.data.name} generates its "
                    f"synthetic tree only under paths.cache_dir ({abspath(cfg.paths.cache_dir)}); for the FLARE "
                    "download pass experiment=flare data.root=/path/to/FLARE_Task5")
            log.info("data=%s: generating the synthetic FLARE-layout demo tree at %s", cfg.data.name, root)
            generate_demo(root, **cfg.data.demo)
    limits = processor_limits(cfg.model)
    log.info("prepare: images held against the processor's limits from %s", limits.source)
    summary = prepare(cfg.data, root, out_dir, limits)
    log.info("prepared data in %s\n%s", out_dir, format_summary(summary))
    return {"prepared_dir": str(out_dir), "records": summary["records"], "rejects": summary["rejects"]}
