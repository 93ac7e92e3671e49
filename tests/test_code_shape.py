"""The package's shape stays as its index says: no import circles between its modules (also
none that an import inside a function hides), and every module named in its package's
index (``course_lib/__init__.py``, ``course_lib/fine_tune/__init__.py``)."""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import code_shape  # noqa: E402


def test_no_import_circles_not_even_hidden_ones():
    shape = code_shape.scan()
    every = {m: set(t) for m, t in shape["imports"].items()}
    for module, _, target, _ in shape["lazy"]:
        if target != module and target in every:
            every[module].add(target)
    assert code_shape.circles(shape["imports"]) == []
    assert code_shape.circles(every) == []


def test_circles_are_found_when_there_are_some():
    imports = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert code_shape.circles(imports) == [["a", "b", "c", "a"]]


def test_every_module_is_in_its_packages_index():
    for package in (REPO / "course_lib", REPO / "course_lib" / "fine_tune",
                    REPO / "course_lib" / "exercises"):
        index = (package / "__init__.py").read_text()
        named = set(re.findall(r"``(\w+)``", index))
        modules = {p.stem for p in package.glob("*.py") if p.stem not in ("__init__",
                                                                          "__main__")}
        modules |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
        assert modules - named == set(), f"{package.name}/__init__.py does not name them"
