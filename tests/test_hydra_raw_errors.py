"""A user's hand-edited defaults list (an experiment copied from conf/experiment/ and changed): what Hydra would
say as its raw one-problem error ("Could not load 'experiment/base_missing'", "Could not override
'experiment/hydra/sweeper@hydra.sweeper'", "data appears more than once in the final defaults list") is one line
naming the file, the entry, what is wrong and what to write, before Hydra starts."""
from __future__ import annotations

import sys

import pytest

from conftest import CONF, REPO

FLARE = (CONF / "experiment" / "flare.yaml").read_text()
SEARCH = (CONF / "experiment" / "reward_search.yaml").read_text()
SWEEPER = "  - override /hydra/sweeper: optuna\n"


def said(tmp_path, capsys, body: str, *extra: str) -> str:
    """What a launch of experiment=mine (body: its text, in a --config-dir) prints, single run and sweep alike."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir(exist_ok=True)
    (tmp_path / "experiment" / "mine.yaml").write_text(body)
    errs = []
    for sweep in ([], ["-m"]):
        with pytest.raises(SystemExit):
            launch.check_command_line([*sweep, f"--config-dir={tmp_path}", "experiment=mine", "stage=runs", *extra])
        errs.append(capsys.readouterr().err)
    assert errs[0] == errs[1] and "Traceback" not in errs[0] and "Config search path" not in errs[0], errs
    return errs[0]


def edited(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize("include, spelled", [("flaer", "`- flare`"), ("/experiment/flaer", "`- /experiment/flare`")])
def test_an_include_that_is_not_there_names_the_file_and_the_groups_files(include, spelled, tmp_path, capsys):
    """Hydra: "In 'experiment/mine': Could not load 'experiment/flaer'" and its search path."""
    err = said(tmp_path, capsys, edited(FLARE, "defaults:\n", f"defaults:\n  - {include}\n"))
    assert (f"{tmp_path}/experiment/mine.yaml: its defaults list includes experiment/flaer (`- {include}`), and "
            "there is no experiment/flaer.yaml in the config dirs; experiment has demo, flare, mine, reward_search "
            f"(did you mean {spelled}?)") in err, err


@pytest.mark.parametrize("where", ["defaults:\n", "  - override /data: flare_xray\n"])
def test_a_group_picked_without_override_says_to_write_override(where, tmp_path, capsys):
    """Hydra: "data appears more than once in the final defaults list" (first), or "Override 'data : flare_xray'
    is defined before 'data: flare_typo'" (after the overrides); a missing option named too."""
    err = said(tmp_path, capsys, edited(FLARE, where, where + "  - /data: flare_typo\n"))
    assert (f"{tmp_path}/experiment/mine.yaml: `- /data: flare_typo` picks data without `override`, but "
            "conf/config.yaml chooses data already: write `- override /data: flare_typo` in its defaults list; and "
            "there is no data/flare_typo.yaml in the config dirs; data "
            "has demo, flare_xray (did you mean data=flare_xray?)") in err, err


@pytest.mark.parametrize("pick", ["  - _self_\n  - /hydra/sweeper: optuna\n", "  - /hydra/sweeper: optuna\n  - _self_\n",
                                  "  - override hydra/sweeper: optuna\n  - _self_\n",
                                  "  - hydra/sweeper: optuna\n  - _self_\n"])
def test_the_sweeper_picked_without_override_or_relatively_shows_the_line_to_write(pick, tmp_path, capsys):
    """Hydra: "Multiple values for hydra/sweeper. To override a value use 'override hydra/sweeper: optuna'" (its
    advice, relative, fails in an experiment file), or "Could not override 'experiment/hydra/sweeper@...'"."""
    err = said(tmp_path, capsys, edited(SEARCH, SWEEPER + "  - _self_\n", pick))
    entry = pick.splitlines()[0 if "_self_" in pick.splitlines()[1] else 1].strip()
    assert f"{tmp_path}/experiment/mine.yaml: `{entry}` " in err, err
    assert "write `- override /hydra/sweeper: optuna` before `- _self_`, as conf/experiment/reward_search.yaml " \
           "does" in err, err
    if "/hydra" not in entry:
        assert "names experiment/hydra/sweeper, which is not there (an entry without a leading / is read inside " \
               "the file's own group)" in err


def test_the_sweeper_overridden_after_self_is_taken(tmp_path):
    """Hydra takes `- override /hydra/sweeper: optuna` after `- _self_` (only an entry without `override` after
    one with it is refused): nothing to say."""
    sys.path.insert(0, str(REPO))
    import launch

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(edited(SEARCH, SWEEPER + "  - _self_\n", "  - _self_\n" + SWEEPER))
    cfg, in_files, _ = launch.composed([f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine", "stage=rl"])
    assert cfg is not None and in_files == []


@pytest.mark.parametrize("pick", ["  - hydra/launcher: slurm\n", "  - override hydra/launcher: slurm\n"])
def test_a_launcher_picked_relatively_says_the_launch_would_not_take_it(pick, tmp_path, capsys):
    """Hydra: "Override 'data : flare_xray' is defined before 'experiment/hydra/launcher@hydra.launcher: slurm'",
    or "Could not override 'experiment/hydra/launcher@hydra.launcher'"."""
    err = said(tmp_path, capsys, edited(FLARE, "  - override /data: flare_xray\n",
                                        "  - override /data: flare_xray\n" + pick))
    assert (f"{tmp_path}/experiment/mine.yaml: `{pick.strip()}` names experiment/hydra/launcher, which is not there "
            "(an entry without a leading / is read inside the file's own group): hydra/launcher is written "
            "/hydra/launcher; as such, its defaults list picks hydra/launcher=slurm, which this launch does not take "
            "(the repo's conf/config.yaml chooses hydra/launcher=watched); choose it on the command line: -m "
            "hydra/launcher=slurm; drop it from the file") in err, err


def test_an_override_of_a_group_nothing_chooses_and_a_pick_after_the_overrides(tmp_path, capsys):
    """Hydra: "Could not override 'cluster'. No match in the defaults list.", then (written without override,
    after the file's overrides) "Override 'data : flare_xray' is defined before 'cluster: big'"; a relative
    `override data:` was "Could not override 'experiment/data@data'"."""
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "big.yaml").write_text("{}\n")
    tail = "  - override /data: flare_xray\n"
    err = said(tmp_path, capsys, edited(FLARE, tail, tail + "  - override /cluster: big\n"))
    assert (f"{tmp_path}/experiment/mine.yaml: `- override /cluster: big` overrides cluster, which nothing before it "
            "chooses: write `- /cluster: big`") in err, err
    err = said(tmp_path, capsys, edited(FLARE, tail, tail + "  - /cluster: big\n"))
    assert (f"{tmp_path}/experiment/mine.yaml: `- /cluster: big` comes after the file's override entries "
            "(`- override /model: qwen3vl_4b`), which Hydra wants last: move it above them") in err, err
    err = said(tmp_path, capsys, edited(FLARE, tail, "  - override data: flare_xray\n"))
    assert ("`- override data: flare_xray` names experiment/data, which is not there (an entry without a leading / is "
            "read inside the file's own group): data is written /data; write `- override /data: flare_xray`") in err


@pytest.mark.parametrize("defaults, expected", [
    # Hydra: "Could not load 'experiment/override /model:tiny'"
    ("defaults:\n  - override /model:tiny\n", "`- override /model:tiny` is one name to YAML (it needs a space after "
                                               "the colon), which Hydra looks for as a file: write `- override /model: "
                                               "tiny`"),
    # Hydra: a traceback ending "ValueError: Invalid defaults list in 'experiment/mine', defaults must be a list"
    ("defaults:\n  override /model: tiny\n", "its defaults is a mapping, and Hydra takes a list, one entry per line "
                                              "starting with '- ': write `defaults:` then `  - override /model: tiny`"),
])
def test_a_defaults_list_yaml_reads_otherwise_says_what_to_write(defaults, expected, tmp_path, capsys):
    err = said(tmp_path, capsys, "# @package _global_\n" + defaults)
    assert f"{tmp_path}/experiment/mine.yaml: {expected}" in err, err


def test_every_value_a_file_sets_that_the_schema_refuses_is_said_at_once(tmp_path, capsys):
    """Hydra stops at the first refused value ("Value 'fast' ... could not be converted to Float"); the next came
    one launch later."""
    err = said(tmp_path, capsys, FLARE + "sft:\n  learning_rate: fast\nmodel:\n  max_seq_length: 1e9\n")
    assert "2 problems with the settings" in err, err
    assert f"{tmp_path}/experiment/mine.yaml: sft.learning_rate=fast: must be a number" in err, err
    assert f"{tmp_path}/experiment/mine.yaml: model.max_seq_length=1e9: must be an integer" in err, err
