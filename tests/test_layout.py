"""The package's imports run one way (README, "Layout"): a module imports only from its own floor or the
floors below, and no import cycle exists between modules. Parsed with ``ast``, so an import inside a
function counts as much as one at the top."""

import ast
from pathlib import Path

import rl_align

ROOT = Path(rl_align.__file__).parent

# bottom to top; a module's floor is that of its name under rl_align (rl_align/agents/sail.py -> agents)
# (the label package spans floors: its store sits at the bottom, the agents' reading of it beside the agents,
# collecting pairs from a run above the runs and evaluation, the page and its command at the top)
FLOORS = [
    {"errors", "buffer", "nets", "logger", "diagnostics", "stats", "multipliers", "losses", "checkpoints", "signals", "labels",
     "labels.store"},
    {"envs", "config", "games", "labels.render"},
    {"agents", "labels.learn"},
    {"runs"},
    {"evaluation"},
    {"sb3", "labels.collect"},
    {"train"},
    {"tournament", "sweep", "report", "labels.server", "labels.cli"},
    {"cli"},
]
FLOOR = {name: k for k, names in enumerate(FLOORS) for name in names}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("rl_align",) + parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module ``name`` imports (``from pkg import submodule`` counts the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rl_align")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("rl_align"):
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def floor_of(module: str) -> int:
    """The floor of the longest name in FLOORS that ``module`` is or lies under (``labels.store``, ``agents``)."""
    parts = module.split(".")[1:]
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in FLOOR:
            return FLOOR[".".join(parts[:k])]
    raise AssertionError(f"{module} has no floor: add it to FLOORS here and to the README's Layout section")


def test_imports_run_one_way_and_form_no_cycle():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items() if name != "rl_align"}
    back = [f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
            for a, deps in graph.items() for b in deps if b != "rl_align" and floor_of(b) > floor_of(a)]
    assert not back, "imports that run up a floor:\n" + "\n".join(back)

    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                return path[path.index(dep):] + [dep]
            if dep not in done:
                found = visit(dep, path + [dep])
                if found:
                    return found
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_checker_sees_a_back_edge_and_a_cycle(tmp_path):
    """The parser finds an import inside a function and a relative one; the search finds a cycle."""
    src = tmp_path / "rl_align" / "agents"
    src.mkdir(parents=True)
    (src / "x.py").write_text("def f():\n    from rl_align.train import train\n")
    (src / "y.py").write_text("from .x import f\n")
    known = {"rl_align.train", "rl_align.agents.x", "rl_align.agents.y", "rl_align.agents"}
    assert imports("rl_align.agents.x", src / "x.py", known) == {"rl_align.train"}
    assert imports("rl_align.agents.y", src / "y.py", known) == {"rl_align.agents.x"}
    assert floor_of("rl_align.train") > floor_of("rl_align.agents.x")
    # the circle this layout removed: base -> lagrangian -> ppo -> base
    assert find_cycle({"base": {"lagrangian"}, "lagrangian": {"ppo"}, "ppo": {"base"}}) == ["base", "lagrangian", "ppo", "base"]
    assert find_cycle({"base": {"lagrangian"}, "ppo": {"base", "lagrangian"}}) is None


# modules whose every reach into an object they are handed goes through that object's public methods
OWN_ONLY = ["labels", "agents/lagrangian.py"]


def foreign_reaches(path: Path) -> list[str]:
    """In each function of ``path``: assignments to an attribute of an argument (``oracle.queries += n``,
    ``agent.cost_value = ...``) and reads of another object's private attribute (``reward._tensors``)."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs} - {"self", "cls"}
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                while isinstance(t, (ast.Attribute, ast.Subscript)):
                    if isinstance(t.value, ast.Name) and t.value.id in args:
                        found.append(f"{path.name}:{node.lineno} {fn.name} writes into its argument {t.value.id}")
                    t = t.value
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.name}:{node.lineno} {fn.name} reads the private {node.attr}")
    return found


def test_labels_and_the_lagrangian_layer_use_other_objects_public_methods_only():
    paths = [p for name in OWN_ONLY for p in ((ROOT / name).rglob("*.py") if (ROOT / name).is_dir() else [ROOT / name])]
    found = [r for p in paths for r in foreign_reaches(p)]
    assert not found, "reaches into another object's internals:\n" + "\n".join(found)


def test_the_reach_checker_sees_a_write_and_a_private_read(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f(oracle, reward, n):\n    oracle.queries += n\n    reward.data['x'] = 1\n    return reward._tensors()\n"
                   "def g(self, seg):\n    self.x = 1\n    out = seg\n    out.obs = 2\n")
    found = foreign_reaches(src)
    assert len(found) == 3 and "argument oracle" in found[0] and "argument reward" in found[1] and "_tensors" in found[2], found


def test_design_citations_name_sections_of_the_repositorys_design_file():
    """Every ``docs/design.md, "Section"`` citation in the code, presets and README names a heading of
    docs/design.md, and nothing cites a design file outside the repository."""
    import re

    repo = ROOT.parent
    headings = {line.lstrip("#").strip() for line in (repo / "docs" / "design.md").read_text().splitlines() if line.startswith("#")}
    files = [*ROOT.rglob("*.py"), *(repo / "envs").glob("*.yaml"), *(repo / "agents").glob("*.yaml"), repo / "README.md"]
    cited, outside = set(), []
    for path in files:
        text = path.read_text()
        for m in re.finditer(r"docs/design\.md[`\])(]*,?\s*\(?((?:\"[^\"]+\"(?:,?\s*(?:and\s*)?)?)+)", text):
            cited |= {(path.name, name) for name in re.findall(r"\"([^\"]+)\"", m.group(1))}
        if re.search(r"(?<!docs/)DESIGN\.md|\.\./shared/", text):
            outside.append(path.name)
    assert cited and not outside, outside
    missing = sorted((f, name) for f, name in cited if name not in headings)
    assert not missing, f"citations of sections docs/design.md does not have: {missing}"
