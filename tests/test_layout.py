"""The package's rooms do not lean on each other: no import cycles (module-level or inside a
function) and no private names imported across modules; systems read what parts declare."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "text23d"


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """{module: the text23d modules it imports anywhere}, and (importer, module.name) of private names."""
    modules = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
               for f in PACKAGE.rglob("*.py")}
    graph, private = {}, []
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("text23d"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
                    if alias.name.startswith("_") and full not in modules:
                        private.append((name, full))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("text23d"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_and_no_private_names_across_modules():
    graph, private = import_graph()
    assert cycles(graph) == [] and private == []


def test_geometry_and_renderers_share_helpers_through_ops_not_each_other():
    """A renderer never imports a geometry module nor a geometry a renderer: what both use lives in
    text23d/ops.py; and the schema (what the pre-flight imports) loads no torch at import (a GPU asked
    for is looked up only then)."""
    graph, _ = import_graph()
    for name, deps in graph.items():
        for a, b in (("text23d.renderers", "text23d.geometry"), ("text23d.geometry", "text23d.renderers")):
            if name.startswith(a):
                assert not [d for d in deps if d.startswith(b)], (name, deps)
    for path in (PACKAGE / "schema").glob("*.py"):
        top = ast.parse(path.read_text()).body  # module level: what importing it loads
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert "torch" not in names, path


def test_the_checks_see_a_cycle_and_a_private_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph, _ = import_graph()
    assert "text23d.jobs" in graph["text23d.gallery"] and "text23d.gallery" in graph["text23d.sweep"]


def test_systems_do_not_ask_which_part_they_hold():
    """Parts declare what they need and provide (guidance/base.py, renderers/base.py, geometry):
    no hasattr/getattr on a stage's guidance, renderer or geometry in systems/."""
    asking = re.compile(r"(hasattr|getattr)\([^)]*(guidance|renderer|geometry|before|new\.)")
    found = [f"{p.name}:{i}" for p in (PACKAGE / "systems").glob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if asking.search(line)]
    assert found == []


def test_renderers_take_what_they_use():
    """A renderer's forward has exactly the base arguments and the options it declares; a system asks
    every renderer for need_normals, jitter and occupancy and each gets only what it declared."""
    import inspect

    from text23d.renderers.mesh import MeshRenderer
    from text23d.renderers.volume import VolumeRenderer

    base = ["self", "geometry", "background", "cams", "height", "width", "shading"]
    asked = dict(need_normals=True, jitter=True, occupancy=None)
    for kind in (VolumeRenderer, MeshRenderer):
        params = list(inspect.signature(kind.forward).parameters)
        assert params[:7] == base and set(params[7:]) == kind.options, (kind, params)
    assert VolumeRenderer().accepted(**asked) == asked and MeshRenderer().accepted(**asked) == {}
