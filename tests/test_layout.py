"""The package's import rules: the reference network, objectives, samplers and guidance never import the
speed package or the kernels; kernels never import the modules above them; importing ditkit loads no
Triton and no kernel; and no two packages import each other (directly or in a longer circle)."""
import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ditkit"


def unit(module: str) -> str:
    """ditkit.fast.recipes -> fast; ditkit.sampling -> sampling."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> dict[str, set[str]]:
    """Each ditkit module (dotted) -> the ditkit modules it imports, at any depth of the file."""
    graph = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ditkit"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ditkit")}
        graph[name] = found
    return graph


def test_the_reference_never_imports_the_fast_path():
    for module, deps in imports().items():
        if unit(module) in ("models", "objectives", "samplers", "guidance"):
            bad = {d for d in deps if unit(d) in ("fast", "kernels")}
            assert not bad, f"{module} imports {bad}"


def test_kernels_import_only_kernels():
    for module, deps in imports().items():
        if unit(module) == "kernels":
            assert all(unit(d) == "kernels" for d in deps), (module, deps)


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for module, deps in imports().items():
        edges.setdefault(unit(module), set()).update(unit(d) for d in deps if unit(d) != unit(module) and unit(d) != "ditkit")
    edges.pop("ditkit", None)  # the package's __init__: the public API, importing from everything below it
    seen, on_path = set(), []

    def visit(node: str) -> None:
        assert node not in on_path, "import cycle: " + " -> ".join(on_path[on_path.index(node):] + [node])
        if node in seen:
            return
        on_path.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        on_path.pop()
        seen.add(node)

    for node in sorted(edges):
        visit(node)


def test_importing_ditkit_loads_no_kernel_and_no_triton():
    code = ("import sys, ditkit, ditkit.models; "
            "print([m for m in sys.modules if m.startswith(('ditkit.kernels', 'triton'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
