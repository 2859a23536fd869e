"""The package's layering, as README's Layout draws it: every import (module level or inside a function) goes to the
same package or to a lower layer, so no two packages import each other."""

import ast
from pathlib import Path

from tests.helpers import REPO

# Lowest first. A package may import its own modules and anything in a lower layer, nothing beside or above it.
LAYERS = [
    ["exit_status", "storage"],
    ["config"],
    ["distributed", "loss", "loggers"],
    ["data", "models", "optim"],
    ["peft"],
    ["training"],
    ["checkpoint"],
    ["backends"],
    ["recipes"],
    ["launcher", "chat"],
    ["cli"],
]
RANK = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def imports_of(path: Path) -> set[str]:
    """The automodel packages a module imports (first component after `automodel.`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "automodel"
                                     else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "automodel" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_import_goes_down_the_layers():
    root = REPO / "automodel"
    packages = {p.name if p.is_dir() else p.stem for p in root.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert packages - {"__main__"} == set(RANK), "every package has a layer (add new ones to LAYERS and README)"
    wrong = []
    for path in root.rglob("*.py"):
        here = path.relative_to(root).parts[0].removesuffix(".py")
        if here in ("__init__", "__main__"):
            continue  # the package's front door (automodel.train) sits above everything
        for target in imports_of(path) - {here}:
            if RANK.get(target, len(LAYERS)) >= RANK[here]:
                wrong.append(f"{path.relative_to(REPO)} imports automodel.{target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_commands_that_need_no_model_start_without_torch(tmp_path):
    """`automodel --help`, `config show`, `launch --slurm --dry-run` and `plot` answer in about a second at most:
    neither torch nor transformers is imported (they cost 3-4 s on 2 cores)."""
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n"
                                               for s in range(1, 5)))
    code = ("import sys, contextlib, io\n"
            "from automodel.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['config', 'show', '--config', 'configs_toml/quickstart.toml']) == 0\n"
            "    assert main(['launch', '--config', 'configs_toml/llm.toml', '--slurm', '--dry-run']) == 0\n"
            f"    assert main(['plot', {str(run)!r}]) == 0\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'deepspeed') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def module_imports(root: Path) -> dict[str, set[str]]:
    """{module: the automodel modules it imports (anywhere in it, a function's body too)}: `from automodel.x import y`
    goes to automodel.x.y where that is a module, else to automodel.x."""
    modules = {".".join(("automodel",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        name = ".".join(("automodel",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("automodel.")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("automodel"):
                for a in node.names:
                    found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_itself_through_others():
    """No cycle between modules (a package's __init__ gathering its modules is one of them): each module can be read
    knowing only what it imports."""
    graph = module_imports(REPO / "automodel")
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)
