"""The shape of ``course_lib``'s code, as a table: the longest modules and functions (lines),
the import circles between its modules, and the imports of its own modules made inside
functions (with the reason each gives on its line, ``# lazy: ...``).

    python scripts/code_shape.py [--top 12] [--json FILE]

Only module-level imports make a circle here (``import a`` at the top of ``b``; a function's
import runs later and is listed apart). Exits 1 when a circle exists, so that CI can keep
the package free of them (``tests/test_code_shape.py``).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "course_lib"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node, module: str, is_package: bool) -> list[str]:
    """The course_lib modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("course_lib")]
    base = node.module or ""
    if node.level:  # relative
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    if not base.startswith("course_lib"):
        return []
    return [base] + [f"{base}.{a.name}" for a in node.names]


def scan(package: Path = PACKAGE) -> dict:
    """``{"modules": {name: lines}, "functions": [(lines, "module.qualname")],
    "imports": {module: {imported module, ...}} (module level only), "lazy": [(module,
    line, target, reason)]}``."""
    files = sorted(package.rglob("*.py"))
    names = {module_name(f) for f in files}
    modules, functions, imports, lazy = {}, [], {}, []
    for f in files:
        name = module_name(f)
        text = f.read_text()
        lines = text.splitlines()
        modules[name] = len(lines)
        tree = ast.parse(text)
        imports[name] = set()

        def visit(node, scope: list[str], in_function: bool):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = scope + [child.name]
                    if not isinstance(child, ast.ClassDef):
                        functions.append((child.end_lineno - child.lineno + 1,
                                          f"{name}.{'.'.join(qual)}"))
                    visit(child, qual, in_function or not isinstance(child, ast.ClassDef))
                elif isinstance(child, (ast.Import, ast.ImportFrom)):
                    found = [t for t in _targets(child, name, f.name == "__init__.py")
                             if t in names]
                    if not found:
                        continue
                    if in_function:
                        reason = lines[child.lineno - 1].partition("# lazy:")[2].strip()
                        lazy.append((name, child.lineno, found[-1] if len(found) == 1
                                     else found[1] if len(found) > 1 else found[0], reason))
                    else:
                        imports[name].update(t for t in found if t != name)
                else:
                    visit(child, scope, in_function)

        visit(tree, [], False)
    # "from course_lib import data" names the package and the module; keep the module.
    for name, targets in imports.items():
        imports[name] = {t for t in targets
                         if not any(o.startswith(t + ".") for o in targets) or t not in names
                         or not (PACKAGE / Path(*t.split(".")[1:])).is_dir()}
    return {"modules": modules, "functions": sorted(functions, reverse=True),
            "imports": imports, "lazy": lazy}


def circles(imports: dict) -> list[list[str]]:
    """Each import circle once, as ``[a, b, ..., a]`` (Tarjan's strongly connected
    components of more than one module, each shown by one cycle through it)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(imports.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(imports):
        if v not in index:
            strong(v)
    found = []
    for comp in comps:  # one cycle through the component's first module (breadth first)
        start, members = comp[0], set(comp)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = [w for w in sorted(imports[path[-1]]) if w in members]
            if start in nxt:
                found.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args(argv)
    shape = scan()
    cycles = circles(shape["imports"])
    every = {m: set(t) for m, t in shape["imports"].items()}
    for module, _, target, _ in shape["lazy"]:
        if target != module and target in every:
            every[module].add(target)
    hidden = [c for c in circles(every) if c not in cycles]
    print(f"{'lines':>6}  longest modules")
    for name, n in sorted(shape["modules"].items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{n:>6}  {name}")
    print(f"\n{'lines':>6}  longest functions")
    for n, name in shape["functions"][:a.top]:
        print(f"{n:>6}  {name}")
    print(f"\nimport circles (module level): {len(cycles)}")
    for c in cycles:
        print("  " + " -> ".join(c))
    print(f"import circles that only imports inside functions hide: {len(hidden)}")
    for c in hidden:
        print("  " + " -> ".join(c))
    print(f"\nimports of the package's own modules inside functions: {len(shape['lazy'])}")
    for module, line, target, reason in shape["lazy"]:
        print(f"  {module}:{line} -> {target}" + (f"  ({reason})" if reason else ""))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "modules": shape["modules"], "functions": shape["functions"][:a.top],
            "circles": cycles, "hidden_circles": hidden, "lazy": shape["lazy"]}, indent=1) + "\n")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
