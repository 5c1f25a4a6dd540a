"""What a stage is, declared once: every stage module under flare_exp/stages/ opens with ``STAGE = Stage(...)``.

The declaration says what the stage reads (the keys naming its input paths) and writes, which settings decide
its outputs and which a resume may change, the files a resumed run continues from, whether it runs on several
ranks, which earlier pipeline steps fill its inputs, and whether it loads the model. Its work is the module's
own functions, found by name when the stage runs: ``run(cfg, out_dir)`` (a small JSON-able summary), and where
it has them ``check_settings(cfg)`` (checked for every step before any work), ``output_dir(cfg, run_dir)``
(outputs outside the run dir: prepare's prepared dir) and ``applied_config(cfg) -> (cfg, decision)`` (settings
sized by the card: the run records the config it applied, its fingerprint keeps the configured one).

Declarations are read from the modules' source (literal values only), not by importing them: a prepare job
never pays for importing torch, and Unsloth is imported before transformers whenever it is chosen. main's
checks, the pipeline, the run's fingerprint and docs/stages.md's table all read these declarations; adding a stage
is its module, its conf/stage/<name>.yaml and its test.
"""
from __future__ import annotations

import ast
import functools
import importlib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType

from omegaconf import OmegaConf

from flare_exp.run.names import placed_by

STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"
RANKS = ("one", "several", "rank 0")
# "model speed" in a stage's free keys: the model.* keys that change only how fast it runs, never what it writes
MODEL_SPEED = ("model.download_hint", "model.build_tiny", "model.attn_implementation", "model.cudnn_attention",
               "model.vision_encoder", "model.decode_attention", "model.fused_prefill",
               "model.gradient_checkpointing", "model.liger_kernel",
               "model.unsloth_offload_activations", "model.cpu_threads")


@dataclass(frozen=True)
class Stage:
    name: str
    help: str = ""  # its line in ``python launch.py --help``
    reads: tuple = ()  # keys naming the paths it reads: checked to exist before any work
    reads_doc: str = ""  # docs/stages.md's "reads" cell
    writes_doc: str = ""  # docs/stages.md's "writes" cell
    defaults: dict = field(default_factory=dict)  # key -> the path read when the key is unset ({dotted.key} filled)
    deciding: tuple = ()  # config keys (whole sections or single keys) whose values decide its outputs
    free: tuple = ()  # keys under those that a resume may change (speed, logging, budgets)
    # the free keys a finished run's outputs still follow (how long it trained, how many records it answered):
    # a resume may change them, a pipeline reusing the finished step may not
    budget: tuple = ()
    fingerprinted: tuple = ()  # keys naming input files whose bytes decide its outputs
    models_read: tuple = ()  # keys naming model dirs (judges) whose contents decide its outputs (sampled digest)
    # key -> the setting without which that file is not read (a held-out set read only by its evals)
    read_when: dict = field(default_factory=dict)
    starts_from: str | None = None  # the key naming the adapter it starts from
    resumable: tuple = ()  # what a resume continues from (globs in its run dir)
    ranks: str = "one"  # several: data-parallel on every rank; rank 0: in a pipeline, rank 0 while others wait
    loads_model: bool = False  # loads the model (its path and backend are checked first)
    trains: bool = False  # trains the model (half precision needs a GPU)
    feeds_from: dict = field(default_factory=dict)  # key -> earlier steps whose dir fills it when unset
    pipeline_step: bool = False  # may be one of stage.steps
    record: str = "attempt"  # attempt: its run dir's lock, attempt, fingerprint; view: only reads; none: no run dir
    module: str = ""  # filled in: the module that declares it

    def runner(self) -> ModuleType:
        return importlib.import_module(self.module)

    def output_dir(self, cfg, run_dir: Path) -> Path:
        runner = self.runner()
        return runner.output_dir(cfg, run_dir) if hasattr(runner, "output_dir") else run_dir

    def check(self, cfg) -> None:
        check = getattr(self.runner(), "check_settings", None)
        if check:
            check(cfg)

    def applied(self, cfg):
        """(the config the stage runs with, what its card sizing changed: None when it sizes nothing)."""
        apply = getattr(self.runner(), "applied_config", None)
        return apply(cfg) if apply else (cfg, None)

    def refuse_before_start(self, cfg, run_dir: Path) -> None:
        """The stage's own refusals that must come before its run dir is touched (a pipeline's finished steps),
        and resume=never on checkpoints a training run left (before the model loads, not after)."""
        self.refuse_resume_never(cfg, run_dir)
        refuse = getattr(self.runner(), "refuse_before_start", None)
        if refuse:
            refuse(cfg, run_dir)

    def refuse_resume_never(self, cfg, run_dir: Path) -> None:
        """resume=never on the checkpoints a training run left: refused before anything is touched."""
        if self.trains and cfg.get("resume") == "never" and not cfg.get("overwrite"):
            from flare_exp.models.checkpoints import list_checkpoints
            from flare_exp.run.record import RunSettingsChangedError

            left = list_checkpoints(run_dir)
            if left:
                raise RunSettingsChangedError(resume_never_refusal(run_dir, left))

    def written_by(self) -> set[str]:
        """The earlier steps whose outputs fill its inputs in a pipeline."""
        return {step for steps in self.feeds_from.values() for step in steps}

    def record_files(self, cfg) -> list[Path]:
        """The record files (.jsonl) it reads with these settings, those that exist: their images are the ones a
        data.root must hold for it."""
        from flare_exp.runtime import abspath

        found = []
        for key in dict.fromkeys((*self.reads, *self.fingerprinted)):
            value = self.path_of(cfg, key)
            if key in self.read_when and not OmegaConf.select(cfg, self.read_when[key]):
                continue
            if isinstance(value, str) and value.endswith(".jsonl") and abspath(value).is_file():
                found.append(abspath(value))
        return found

    def path_of(self, cfg, key: str):
        """The value of a key naming a path, or where the stage reads when it is unset (``defaults``)."""
        value = OmegaConf.select(cfg, key)
        if value or key not in self.defaults:
            return value
        return re.sub(r"\{([\w.]+)\}", lambda m: str(OmegaConf.select(cfg, m.group(1))), self.defaults[key])


def resume_never_refusal(run_dir: Path, checkpoints: list[Path]) -> str:
    """The refusal of resume=never on ``checkpoints`` (oldest first): each named, the newest last."""
    names = [c.name for c in checkpoints]
    shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, ... {len(names) - 2} more ..., {names[-1]}"
    return (f"{run_dir} already holds checkpoints ({shown}) and resume=never: use resume=auto to continue, "
            "overwrite=true to start afresh (the earlier attempt moves to attempts/NN/), or another "
            f"{placed_by(run_dir)}=")


def _declaration(path: Path) -> Stage | None:
    """The ``STAGE = Stage(...)`` of one module, read from its source; None for a module that declares none."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["STAGE"]
                and isinstance(node.value, ast.Call)):
            try:
                values = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
            except ValueError as e:
                raise ValueError(f"{path}: STAGE = Stage(...) takes literal values only ({e})") from e
            unknown = set(values) - {f.name for f in fields(Stage)}
            if unknown or node.value.args:
                raise ValueError(f"{path}: Stage() takes keyword arguments of {[f.name for f in fields(Stage)]}; "
                                 f"got {sorted(unknown) or 'positional ones'}")
            free = values.get("free", ())
            values["free"] = tuple(k for key in free for k in (MODEL_SPEED if key == "model speed" else (key,)))
            stage = Stage(**values, module=f"flare_exp.stages.{path.stem}")
            if stage.ranks not in RANKS:
                raise ValueError(f"{path}: ranks={stage.ranks!r}: choose one of {RANKS}")
            return stage
    return None


@functools.lru_cache(maxsize=None)
def declared_stages() -> dict[str, Stage]:
    """Every declared stage by name, in the order the README lists them (the pipeline's order first)."""
    found = [s for path in sorted(STAGES_DIR.glob("*.py")) if (s := _declaration(path))]
    order = ("prepare", "sft", "rl", "infer", "eval", "pipeline", "sweep_report", "runs")
    return {s.name: s for s in sorted(found, key=lambda s: (order.index(s.name) if s.name in order else len(order),
                                                             s.name))}


def stage(name: str) -> Stage:
    known = declared_stages()
    if name not in known:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(known)}")
    return known[name]


def get_runner(name: str) -> ModuleType:
    """The module of a stage: imported only when its stage runs."""
    return stage(name).runner()


def several_ranks() -> set[str]:
    return {s.name for s in declared_stages().values() if s.ranks == "several"}


def infer_input_file(cfg) -> str:
    """What infer reads: infer.input_file, else the prepared split (``${data.prepared_dir}/<infer.split>.jsonl``)."""
    return stage("infer").path_of(cfg, "infer.input_file")


def stage_help() -> str:
    """The stages' lines of ``python launch.py --help`` (conf/config.yaml's help template: ``${stage_help:}``)."""
    return "\n".join(f"  {name:<14}{s.help}" for name, s in declared_stages().items())


# Hydra's help page lists the stages through this resolver (launch.py imports this module first).
if not OmegaConf.has_resolver("stage_help"):
    OmegaConf.register_new_resolver("stage_help", stage_help)


def stage_table() -> str:
    """docs/stages.md's table of inputs and outputs, from the declarations."""
    rows = [f"| `{s.name}` | {s.reads_doc} | {s.writes_doc} |" for s in declared_stages().values() if s.writes_doc]
    return "\n".join(["| stage | reads | writes (in its run dir) |", "|---|---|---|", *rows])
