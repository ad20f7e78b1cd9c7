"""The package's layers import in one direction: a module imports only its own layer or lower.

Every module under ``src/mechunlearn`` is parsed with ``ast``; every ``import`` and
``from ... import`` counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``). Layers, lowest first:

0. the ground modules at the package top (``errors``, ``schema``, ``registry``, ``io``,
   ``runtime``, ``progress``, ``plotting``)
1. ``tasks``  2. ``models``  3. ``localize``  4. ``edit``  5. ``evals``  6. ``attacks``
7. ``reasoning``  8. ``report``  9. ``experiments``  10. ``cli``

``mechunlearn.testing`` is test scaffolding: it may import anything below ``experiments``,
and no library module may import it. The package's own ``__init__`` and ``__main__``
(``python -m mechunlearn`` runs the CLI) sit above everything; ``from mechunlearn import
__version__`` is allowed anywhere (importing any submodule runs the package ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mechunlearn"
GROUND = ("errors", "schema", "registry", "io", "runtime", "progress", "plotting")
LAYERS = (
    "tasks",
    "models",
    "localize",
    "edit",
    "evals",
    "attacks",
    "reasoning",
    "report",
    "experiments",
    "cli",
)
TESTING = "testing"
# Scaffolding sits between report and experiments: it may use everything below experiments.
TESTING_LAYER = LAYERS.index("experiments") + 0.5
# The package entry points sit above everything: ``python -m mechunlearn`` runs the CLI.
TOP = {"mechunlearn": len(LAYERS) + 1, "mechunlearn.__main__": len(LAYERS) + 1}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> float | None:
    """The layer of a ``mechunlearn`` module (``None``: not part of the package)."""
    if module in TOP:
        return TOP[module]
    parts = module.split(".")
    if parts[0] != "mechunlearn" or len(parts) < 2:
        return None
    head = parts[1]
    if head in GROUND:
        return 0
    if head in LAYERS:
        return LAYERS.index(head) + 1
    if head == TESTING:
        return TESTING_LAYER
    raise AssertionError(f"{module}: not in any layer; add it to tests/test_layers.py")


def imported_modules(path: Path, module: str) -> set[str]:
    """Every ``mechunlearn`` module ``path`` imports (absolute or relative, at any depth)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from mechunlearn import report`` imports the subpackage itself.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).is_dir() or (
                    PACKAGE.parent / (candidate.replace(".", "/") + ".py")
                ).is_file():
                    found.add(candidate)
    return {name for name in found if name == "mechunlearn" or name.startswith("mechunlearn.")}


def violations() -> list[tuple[str, str]]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = layer(module)
        is_testing = module.split(".")[1:2] == [TESTING]
        for target in sorted(imported_modules(path, module)):
            if target == "mechunlearn" and module != "mechunlearn":
                # ``from mechunlearn import __version__``: the package ``__init__`` imports nothing.
                continue
            theirs = layer(target)
            if theirs is None:
                continue
            if target.split(".")[1:2] == [TESTING] and not is_testing:
                bad.append((module, target))
            elif theirs > own:
                bad.append((module, target))
    return bad


def test_layers_import_downward_only():
    bad = violations()
    assert not bad, "modules importing a higher layer (or mechunlearn.testing):\n" + "\n".join(
        f"  {module} -> {target}" for module, target in bad
    )


def test_every_layer_exists():
    for name in LAYERS + (TESTING,):
        assert (PACKAGE / name / "__init__.py").is_file(), name
    for name in GROUND:
        assert (PACKAGE / f"{name}.py").is_file(), name


def test_the_check_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import mechunlearn.report.results as results\n"
        "from mechunlearn import cli\n"
        "if TYPE_CHECKING:\n"
        "    from mechunlearn.attacks.latent import latent_attack\n"
        "def f():\n"
        "    from mechunlearn.testing.tiny_models import tiny_model\n"
        "    from ..experiments import config\n",
        encoding="utf-8",
    )
    found = imported_modules(source, "mechunlearn.localize.fake")
    assert {
        "mechunlearn.report.results",
        "mechunlearn.cli",
        "mechunlearn.attacks.latent",
        "mechunlearn.testing.tiny_models",
        "mechunlearn.experiments",
    } <= found
    assert layer("mechunlearn.localize.fake") < layer("mechunlearn.report.results")
    assert layer("mechunlearn.report.results") < layer("mechunlearn.testing.planted")
    assert layer("mechunlearn.testing.planted") < layer("mechunlearn.experiments.config")
