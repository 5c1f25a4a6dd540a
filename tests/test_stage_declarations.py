"""Each stage declares itself once (flare_exp/run/stage.py): the declarations are read without importing the
stage modules, docs/stages.md's table is theirs, and a declaration that is not literal data is refused."""
import subprocess
import sys
from pathlib import Path

import pytest

from flare_exp.run import layout
from flare_exp.run.stage import _declaration, declared_stages, stage_table

ROOT = Path(__file__).resolve().parent.parent


def test_the_stage_table_in_the_docs_is_the_declarations():
    assert stage_table() in (ROOT / "docs" / "stages.md").read_text()


def test_every_stage_has_its_yaml_and_reading_them_imports_no_stage_module():
    names = set(declared_stages())
    assert names == {p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml")}
    code = ("import sys; from flare_exp.run.stage import declared_stages; declared_stages(); "
            "print(sorted(m for m in sys.modules if m.startswith(('flare_exp.stages.', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_declarations_name_the_run_dirs_files():
    assert layout.PREDICTIONS in declared_stages()["infer"].resumable
    assert {s.name for s in declared_stages().values() if s.ranks == "several"} == {"sft", "rl", "infer", "eval"}


def test_a_declaration_takes_literal_values_only(tmp_path):
    module = tmp_path / "odd.py"
    module.write_text("STAGE = Stage(name='odd', reads=KEYS)\n")
    with pytest.raises(ValueError, match="literal values only"):
        _declaration(module)
    module.write_text("STAGE = Stage(name='odd', ranks='many')\n")
    with pytest.raises(ValueError, match="ranks='many'"):
        _declaration(module)
