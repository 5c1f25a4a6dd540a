"""The package's layering, read from its source: no import circle, no stage importing another stage and nothing
else importing a stage, one registry of reward terms, reports in reports/ and scorers in metrics/."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "flare_exp"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (at the top or inside a function): ``from a import b``
    counts as ``a.b`` when that is a module, else as ``a``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return found & known


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p): p for p in root.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_stage_imports_another_stage():
    graph = import_graph()
    stages = {module_name(p) for p in (PACKAGE / "stages").glob("*.py")
              if any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in ast.parse(p.read_text()).body)}
    assert {s: sorted(graph[s] & stages) for s in stages if graph[s] & stages} == {}



# The bench's memory probe builds sft's trainer as the stage does (its datasets, arguments and trainer).
STAGE_READERS_OUTSIDE = {"bench.card": ["flare_exp.stages.sft"]}


def test_nothing_outside_the_stages_imports_a_stage():
    """What stages share (batch decoding, scoring, the significance tests) lives outside flare_exp/stages/: the
    product, the bench and the Hydra plugins import no stage module; the stage registry (flare_exp/run/stage.py)
    loads them by name."""
    sources = [*PACKAGE.rglob("*.py"), *(REPO / "bench").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py"),
               REPO / "launch.py"]
    files = {module_name(p): p for p in sources}
    in_stages = lambda name: name == "flare_exp.stages" or name.startswith("flare_exp.stages.")  # noqa: E731
    stage_modules = {name for name in files if in_stages(name)}
    readers = {name: sorted(imported_modules(path, set(files)) & stage_modules)
               for name, path in files.items() if not in_stages(name)}
    assert {name: read for name, read in readers.items() if read} == STAGE_READERS_OUTSIDE

def test_every_reward_term_is_in_the_one_registry():
    """Each class of flare_exp/rewards/ that scores completions is named in rewards.TERMS, which loads it."""
    from flare_exp.rewards import TERMS, get_term

    defined = {f"flare_exp.rewards.{p.stem}:{n.name}" for p in (PACKAGE / "rewards").glob("*.py")
               for n in ast.parse(p.read_text()).body if isinstance(n, ast.ClassDef)
               and any(isinstance(f, ast.FunctionDef) and f.name == "__call__" for f in n.body)
               and not n.name.startswith("Combined")}
    assert set(TERMS.values()) == defined
    assert all(get_term(name).__name__ == TERMS[name].split(":")[1] for name in TERMS)


def test_rewards_take_their_scorers_from_metrics_and_nothing_reads_a_reward_for_a_metric():
    graph = import_graph()
    rewards = {m for m in graph if m.startswith("flare_exp.rewards")}
    readers = {m for m, deps in graph.items() if deps & rewards and m not in rewards}
    assert readers <= {"flare_exp.stages.rl", "flare_exp.setting_checks"}, readers
    assert "flare_exp.metrics.radgraph_f1" in graph["flare_exp.rewards.radgraph_term"]


def test_one_markdown_table_writer():
    from flare_exp.reports.tables import md_table

    assert md_table(["run", "f1", "note"], [["a", 0.5, "x|y"], ["b", None, "z"]], cell=lambda v: str(v)) == [
        "| run | f1 | note |", "|---|---|---|", "| a | 0.5 | x\\|y |", "| b | None | z |", ""]
    assert md_table(["run", "f1"], [["a", "0.5000"], ["b", "n/a"]])[1] == "|---|---:|"
