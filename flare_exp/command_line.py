"""The command line checked before Hydra composes it: keys the schema lacks (with the closest), values Hydra's
grammar cannot read, run names, the sweeper's and the SLURM launcher's settings, and a single run's every other
problem (settings, input paths, the user's config files), said in one message; nothing is run or written."""
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BEFORE_HYDRA = "checked before Hydra started: nothing was run or written"


def refuse(error: Exception, note: str = "HYDRA_FULL_ERROR=1 shows the traceback; a stage that had started also "
                                          "wrote it to FAILED in its run dir") -> None:
    print(f"\n{speaker()}: {type(error).__name__}: {own_message(error)}\n({note})", file=sys.stderr)
    sys.exit(1)


def speaker() -> str:
    """Who says a refusal: under torchrun each rank reaches the same checks and says so, each named (the same
    message twice is two ranks, not one said twice; a rank's own problem is told apart)."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"flare-exp (rank {os.environ.get('RANK', '0') or '0'} of {size})" if size > 1 else "flare-exp"


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def own_message(error: Exception) -> str:
    """The error's message; one raised in a DataLoader worker (torch re-raises it with the worker's traceback
    inside the message) as its own message, the worker named after it."""
    text = str(error)
    if WORKER_TRACEBACK not in text:
        return text
    where, traceback = text.split(WORKER_TRACEBACK, 1)
    prefix = f"\n{type(error).__name__}: "
    at = traceback.rfind(prefix)
    message = traceback[at + len(prefix):] if at >= 0 else traceback.strip().splitlines()[-1]
    return f"{message.strip()} ({where.strip().removeprefix('Caught ').rstrip('.')})"


def flags_first(argv: list[str]) -> list[str]:
    """The command line with Hydra's flags (and their values) before the overrides, each kept in its order:
    Hydra's parser reads overrides only after its flags, so ``a=1 -m b=2`` was its usage dump. A line it reads
    as given, or one it cannot read either way, is returned as it was (Hydra's parser then says what is wrong)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    if not _unread(parser, argv):
        return argv
    takes_value = {s: a.nargs for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    flags, overrides, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and len(token) > 1:
            flags.append(token)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if token in takes_value and nxt is not None and not nxt.startswith("-") and (
                    takes_value[token] is None or "=" not in nxt):  # a flag's value: never an override (key=value)
                flags.append(nxt)
                i += 1
        else:
            overrides.append(token)
        i += 1
    reordered = flags + overrides
    return argv if _unread(parser, reordered) else reordered


def _unread(parser, argv: list[str]) -> bool:
    """Whether Hydra's parser leaves part of ``argv`` unread (or refuses it)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return bool(parser.parse_known_args(argv)[1])
    except SystemExit:
        return True


def check_command_line(argv: list[str]) -> None:
    """Before Hydra composes: a key the schema lacks, with or without ``+``, is named with the closest key
    (Hydra's own advice, "use +key=value", adds a key no stage reads). A single run also hears every other
    problem of its settings in the same message (composed without the unknown keys); a sweep (-m), whose
    values are lists, hears the keys alone."""
    from hydra._internal.utils import get_args_parser

    from flare_exp.config import Config
    from flare_exp.config_dirs import searched_dirs, with_config_dir
    from flare_exp.config_keys import override_key_problems

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return  # Hydra's parser says what is wrong with the flags
    if args.multirun and args.cfg:  # Hydra's answer is a traceback
        refuse(ValueError(f"-m with --cfg {args.cfg}: --cfg prints one composed config; drop -m and give one "
                          "value per key (the job you want to see)"), BEFORE_HYDRA)
    check_parsable(args.overrides)
    check_run_name_override(args.overrides, args.multirun)
    check_sweeper_params(args.overrides)
    check_slurm_launcher(args.overrides, args.multirun)
    try:
        overrides = with_config_dir(args.overrides, args.config_dir)
    except ValueError as e:  # a --config-dir Hydra would not find
        refuse(e, BEFORE_HYDRA)
    groups = {p.name for d in [CONF_DIR, *searched_dirs(overrides)] if d.is_dir() for p in d.iterdir() if p.is_dir()}
    unknown = override_key_problems(args.overrides, Config, groups)  # and values of the wrong type
    problems: list[Exception] = [ValueError(p) for p in unknown.values()]
    asks_hydra = any(getattr(args, flag, None) for flag in (
        "help", "hydra_help", "version", "info", "cfg", "shell_completion", "experimental_rerun"))
    # another primary config (--config-name / --config-path); --config-dir alone only adds a dir to search
    own_config = any(getattr(args, flag, None) for flag in ("config_name", "config_path"))
    known = [o for o in overrides if o not in unknown]
    if args.multirun and not asks_hydra:  # a sweep: its dir goes under the output root before any job runs
        problems += sweep_root_problems(known) + sweep_file_problems(known, groups)
    if not args.multirun and not asks_hydra and not own_config:
        # a single run's settings and inputs, checked before Hydra makes its run dir (a refused run leaves none);
        # with another primary config (--config-name/-dir) the run checks them itself, against that config
        # a key whose value was refused was left out of the composition: what that leaves is no second problem
        refused = tuple(f"{o.split('=', 1)[0].lstrip('+~')}{end}" for o in unknown for end in "= :")
        problems += [p for p in other_setting_problems(known) if not refused or not str(p).startswith(refused)]
    elif args.cfg and not own_config:  # --cfg job: a config file it cannot read is said in one line too
        problems += composed(known)[1]
    if not problems:
        return
    from flare_exp.checks import settings_error

    refuse(settings_error(problems), BEFORE_HYDRA)


def check_parsable(overrides: list[str]) -> None:
    """An override Hydra's grammar cannot read (a space, a parenthesis or a non-ASCII letter in a bare value: a
    path like "preds (Dr Müller).xlsx") gets one line saying how to quote it, not the lexer's report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from flare_exp.config import Config
    from flare_exp.config_keys import takes_list

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception:  # noqa: BLE001  (Hydra's grammar errors: several types)
            key, sep, value = override.partition("=")
            if not sep or not value or value[0] in "'\"":
                continue  # no value, or quoted already: Hydra's own message says what is wrong
            if value.startswith("~") and key.lstrip("+~") == "run_name":
                check_run_name_override([f"run_name={value}"])  # a name, not a path: the name's own rule
            if value.startswith("~"):  # the shell expands ~ only at a word's start, never after key=
                refuse(ValueError(f"{override}: '~' is not expanded after {key}= (the shell expands it only at a "
                                  f"word's start, and flare-exp reads paths as written): write {key}=$HOME"
                                  f"{value[1:]} (the shell fills in $HOME)"), BEFORE_HYDRA)
            example = f"{key}=\"{value}\""
            if value.startswith("[") and value.endswith("]") and "," not in value:
                example = f"{key}=[\"{value[1:-1]}\"]"
            elif takes_list(Config, key.lstrip("+~")):  # a list key: the quoted value inside its brackets
                example = f"{key}=[\"{value}\"]"
            refuse(ValueError(f"{override}: Hydra's grammar cannot read this value bare (spaces, parentheses, '=' "
                              f"or non-ASCII letters need quotes): write '{example}' (the shell's single quotes "
                              "around Hydra's double ones)"),
                   BEFORE_HYDRA)


def check_run_name_override(overrides: list[str], multirun: bool = False) -> None:
    """run_name places the run dir, which Hydra resolves before any of our code runs: a bad one would surface
    as Hydra's formatting traceback, so it is refused here, in one line."""
    from flare_exp.run.names import check_run_name

    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == "run_name":
            try:
                if multirun and "," in value.strip("'\""):  # a sweep's jobs would land in one sweep dir each
                    raise ValueError(f"run_name={value} sweeps run_name: it names the sweep dir itself "
                                     "(sweeps/<run_name>/<job>), so each job would land in a sweep of its own that "
                                     "neither a rerun nor sweep_report finds. Sweep other keys and give one run_name")
                check_run_name(value.strip("'\""))
            except ValueError as e:
                refuse(e, BEFORE_HYDRA)


def check_sweeper_params(overrides: list[str]) -> None:
    """hydra.sweeper.params.KEY=... on the command line: Hydra fails on it with an AssertionError from OmegaConf
    (the basic sweeper's params are null until a config sets them); the command line sweeps KEY itself."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if sep and key.startswith("hydra.sweeper.params."):
            swept = key[len("hydra.sweeper.params."):]
            refuse(ValueError(f"{override}: on the command line a sweep names the key itself, with -m: python "
                              f"launch.py -m {swept}={value} (hydra.sweeper.params is for an experiment file, "
                              "conf/experiment/)"), BEFORE_HYDRA)


def check_slurm_launcher(overrides: list[str], multirun: bool) -> None:
    """hydra/launcher=slurm submits a sweep's jobs through SLURM. Without -m Hydra ignores the launcher and runs
    the job here (on a login node: a whole training job); off the cluster submitit stops with a traceback
    ("Could not detect srun") after Hydra has composed the sweep. Both are refused in one line."""
    import shutil

    if "hydra/launcher=slurm" not in (o.replace(" ", "") for o in overrides):
        return
    if not multirun:
        refuse(ValueError("hydra/launcher=slurm submits the jobs of a sweep (-m); without -m this job would run "
                          "here, on this machine. Add -m (one job is a sweep too) or leave the launcher out"),
               BEFORE_HYDRA)
    if not shutil.which("srun"):
        refuse(RuntimeError("hydra/launcher=slurm: SLURM's srun is not on this machine's PATH (run the sweep from "
                            "a login node of the cluster), or sweep here with hydra/launcher=local (jobs as local "
                            "processes) or hydra/launcher=watched (the default: one after another in this process)"),
               BEFORE_HYDRA)


def sweep_root_problems(overrides: list[str]) -> list[Exception]:
    """A sweep's output root (its one value; a sweep over several is left to the jobs) that cannot be written: one
    line, before Hydra makes the sweep dir (else its OSError traceback)."""
    from flare_exp.checks import check_writable
    from flare_exp.config import PathsConfig

    given = [o.split("=", 1)[1] for o in overrides if o.startswith(("paths.output_root=", "+paths.output_root="))]
    root = given[-1] if given else PathsConfig.output_root
    if "," in root or "${" in root:
        return []
    try:
        check_writable("paths.output_root", root)
    except ValueError as e:
        return [e]
    return []


def sweep_file_problems(overrides: list[str], groups: set[str]) -> list[Exception]:
    """A sweep's group files (``experiment=a,b``, and a fixed ``+cluster=mine``): each choice composed once with
    the sweep's fixed overrides, and a file's own problem (not YAML, a key the schema lacks, a value its type
    refuses) said in one line, as a single run hears it (Hydra's sweeper would stop on the first with its own
    error). Other sweep values are the jobs'."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed, choices = [], []
    for override in overrides:
        try:
            parsed = parser.parse_override(override)
        except Exception:  # noqa: BLE001  (Hydra's own complaint comes)
            return []
        if not parsed.is_sweep_override():
            fixed.append(override)
        elif parsed.get_key_element().lstrip("+~").split("@")[0] in groups and not parsed.is_delete():
            key, value = override.split("=", 1)
            try:
                choices += [f"{key}={each}" for each in parsed.sweep_string_iterator()]
            except Exception:  # noqa: BLE001  (glob(...): the group's options; a range or interval: not names)
                if value.startswith("glob("):
                    from flare_exp.config_dirs import searched_dirs, sweep_values

                    dirs = [CONF_DIR, *searched_dirs(overrides)]
                    choices += [f"{key}={each}" for each in sweep_values(value, key.lstrip("+~").split("@")[0], dirs)]
    problems: dict[str, Exception] = {}
    for choice in choices or [None]:  # the fixed overrides' own group files are composed in each
        # a missing option said of the whole command line: the same text from each choice's composition, once
        for problem in composed([*fixed, *([choice] if choice else [])], said_of=overrides, sweep=True)[1]:
            problems.setdefault(str(problem), problem)
    return list(problems.values())


def other_setting_problems(known_overrides: list[str]) -> list[Exception]:
    """A single run's problems (settings and input paths), composed as Hydra will. Nothing when composing fails
    (Hydra's own complaint comes then); a value that needs Hydra's runtime to resolve (``${hydra:runtime.cwd}``)
    is left to the run's own check, where it resolves."""
    from omegaconf.errors import InterpolationResolutionError

    from flare_exp.checks import named_with_files, problems_of

    cfg, in_files, from_files = composed(known_overrides)
    if cfg is None:
        return in_files
    try:
        problems = problems_of(cfg, inputs=True)
    except Exception:  # noqa: BLE001
        return []
    problems = [p for p in problems if not _needs_hydra_runtime(p, InterpolationResolutionError)]
    return in_files + named_with_files(problems, from_files)


def composed(overrides: list[str], said_of: list[str] | None = None, sweep: bool = False) -> tuple:
    """(the config as Hydra will compose it, the values its group files set that the schema's types refuse or
    misread, the keys the user's own group files set -> the file), or (None, [a config file's own problem], {});
    (None, [], {}) when composing fails otherwise (Hydra's own complaint comes then). ``said_of``: the command
    line a missing option's problem lists every miss of (a sweep's, where ``overrides`` are one job's); ``sweep``:
    its sweeper's settings too."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from flare_exp.config import Config
    from flare_exp.config_dirs import composed_dirs, ignored_hydra_picks, searched_dirs, shadowed_files, users_files
    from flare_exp.config_keys import file_value_problems, group_file_values, refused_file_values
    from flare_exp.optuna_settings import sweeper_problems

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001
        dirs = [CONF_DIR, *searched_dirs(overrides)]
        every = [ValueError(p) for p in refused_file_values(e, dirs, Config)]  # each, not the first alone
        found = config_file_problem(e, dirs, said_of or overrides)
        return None, every if len(every) > 1 else [found] if found else [], {}
    # the group files it read, in the config dirs Hydra searched, in its order (conf/, then hydra.searchpath's)
    dirs = composed_dirs([CONF_DIR], cfg)
    choices = dict(cfg.hydra.runtime.choices)
    values = list(group_file_values(dirs, choices))  # in Hydra's order: the last file to set a key sets it
    in_files = [ValueError(p) for p in shadowed_files(dirs, choices, CONF_DIR) + file_value_problems(values, Config)
                + ignored_hydra_picks(dirs, choices, overrides)]
    from_files = users_files(values, overrides, CONF_DIR)
    if sweep:  # the sweeper's settings, before any trial runs
        in_files += sweeper_problems(cfg.hydra.sweeper, bool(cfg.eval.green.model_path))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, in_files, from_files


def config_file_problem(error: BaseException, conf_dirs: list[Path] = (),
                        overrides: list[str] = ()) -> Exception | None:
    """A config file the run composes (an experiment file of the user's) that is not valid YAML (an indent, a
    duplicate key), sets a key the schema lacks or a value its type refuses, or picks a group option that does
    not exist (in its defaults list, or ``overrides``' choice) or a Hydra group after its overrides
    (config_dirs.choice_problem): one line naming the file and line, or the key
    with the closest one and the file (found in ``conf_dirs``, Hydra's search order, from the "In
    'experiment/mine'" Hydra's error starts with), or the option with the group's own. Hydra prints a long YAML
    traceback, its struct error without a suggestion, or "In 'config'" for a user file's missing option."""
    import yaml
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    from flare_exp.config import Config
    from flare_exp.config_dirs import choice_problem
    from flare_exp.config_keys import file_unknown_keys, unknown_path

    said = choice_problem(str(error), list(overrides), list(conf_dirs))
    if said:
        return ValueError(said)

    named = re.match(r"In '([^']+)'", str(error))  # Hydra's ConfigCompositionException: the group file
    file = next((f for d in conf_dirs if named and (f := d / f"{named.group(1)}.yaml").is_file()), None)
    package = re.search(r"Could not override '[^'@]+@([^.']+)\.", str(error))  # its defaults list's, in its package
    group = named.group(1).split("/")[0] if named else None
    if file and package and package.group(1) == group and unknown_path(group, Config):
        return ValueError(f"{file}: its defaults list picks groups under '{group}.' (the group's own package), where "
                          "there are none: a file that picks other groups (override /model: ...) or sets stage keys "
                          f"needs '# @package _global_' as its first line, as conf/{group}/*.yaml have")
    given = re.match(r"Error merging override (.+)|Could not override '(.+?)'", str(error))  # the command line's
    source = (f"on the command line ({(given.group(1) or given.group(2)).strip()})" if given else f"in {file}" if file else
              "in a config file this run composes (an experiment or other group file)")
    for error in causes(error):
        if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
            mark = error.problem_mark
            return ValueError(f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: "
                              f"{error.problem}" + (f" ({error.context})" if error.context else ""))
        if isinstance(error, ValidationError) and getattr(error, "full_key", None):
            return ValueError(f"{error.full_key}: {str(error).splitlines()[0]}, set {source}")
        if isinstance(error, ConfigKeyError) and str(getattr(error, "full_key", "")).startswith("hydra.launcher."):
            return ValueError(f"{error.full_key} is no setting of the launcher this launch composes, set {source}: "
                              "a launcher's settings follow its choice, which the command line makes (e.g. -m "
                              "hydra/launcher=slurm hydra.launcher.partition=gpu); docs/slurm.md lists them")
        if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and \
                str(getattr(error, "full_key", "")).startswith("hydra.sweeper."):
            import difflib

            *parent, last = str(error.full_key).split(".")
            keys = [str(k) for k in (getattr(error, "parent_node", None) or {}).keys()]
            near = difflib.get_close_matches(last, keys, n=1)
            return ValueError(f"{error.full_key} is no setting of the sweeper this launch composes, set {source}" + (
                f" (did you mean {'.'.join(parent)}.{near[0]}?)" if near else "") + ": Optuna's sweeper "
                "(hydra/sweeper=optuna) has the settings conf/hydra/sweeper/optuna.yaml lists; an argument of its "
                "pruner or sampler that is not there yet is added with a leading + (e.g. "
                "+hydra.sweeper.pruner.min_resource=3)")
        if isinstance(error, ConfigKeyError) and getattr(error, "full_key", None):
            if file and str(error.full_key).split(".")[0] == group and unknown_path(group, Config):
                # a group whose package is no section (experiment/): its keys landed under the group's name
                return ValueError(f"{file}: its keys land under '{group}.' (the group's own package): a file that "
                                  "sets stage keys (sft:, rl:, ...) needs '# @package _global_' as its first line, "
                                  f"as conf/{group}/*.yaml have")
            found = unknown_path(str(error.full_key), Config)
            if found:
                every = (file_unknown_keys(conf_dirs, named.group(1), Config) if file else []) or [found]
                return ValueError(f"unknown config key{'s' if len(every) > 1 else ''} {'; '.join(every)}, set "
                                  f"{source}; python launch.py --cfg job lists every key")
    return None


def _needs_hydra_runtime(problem: BaseException, interpolation_error: type) -> bool:
    return any(isinstance(p, interpolation_error) or "HydraConfig was not set" in str(p) for p in causes(problem))


def causes(error: BaseException | None):
    """``error`` and what it was raised from or while handling, outermost first."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
