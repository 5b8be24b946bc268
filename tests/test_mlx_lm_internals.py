"""mlx-lm's internals behind one door (mlx_diffusiongemma/mlx_lm_internals.py):
each assumption holds on the installed mlx-lm, a broken one is named, and no
other module of the package reaches a private name of mlx-lm."""

import ast
from pathlib import Path

import pytest
from mlx_lm.models.cache import BatchKVCache, RotatingKVCache

from mlx_diffusiongemma import mlx_lm_internals

PACKAGE = Path(mlx_lm_internals.__file__).parent
DOOR = "mlx_lm_internals.py"


def test_every_assumption_holds_on_the_installed_mlx_lm():
    mlx_lm_internals.check_layouts()


def test_a_broken_assumption_is_named(monkeypatch):
    monkeypatch.delattr(RotatingKVCache, "_temporal_order")
    with pytest.raises(AssertionError, match=r"RotatingKVCache\._temporal_order\(v\) puts its ring in temporal order"):
        mlx_lm_internals.check_layouts()
    monkeypatch.undo()
    monkeypatch.setattr(BatchKVCache, "state", property(lambda self: (self.keys, self.values)))
    with pytest.raises(AssertionError, match=r"BatchKVCache\.state is \(keys, values, offset, left_padding, idx\)"):
        mlx_lm_internals.check_layouts()


def _private_uses(tree: ast.AST) -> set:
    """Underscored names reached on something other than self or cls, and underscored names imported from mlx_lm."""
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                uses.add(node.attr)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_lm"):
            uses.update(a.name for a in node.names if a.name.startswith("_"))
    return uses


def _own_names(tree: ast.AST) -> set:
    """Underscored names the package defines: functions, methods, classes, attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_")}


def test_no_other_module_reaches_a_private_name_of_mlx_lm():
    trees = {f.name: ast.parse(f.read_text()) for f in PACKAGE.glob("*.py")}
    own = set().union(*(_own_names(t) for name, t in trees.items() if name != DOOR))
    outside = {name: sorted(_private_uses(t) - own) for name, t in trees.items() if name != DOOR}
    assert {name: uses for name, uses in outside.items() if uses} == {}
    assert {"_temporal_order", "_idx", "_merge_caches"} <= _private_uses(trees[DOOR])  # the scan sees them
