"""Training recipes that come with the package, addressed by name on ``tree train --config``.

``shipped`` is the shipped checkpoint's own recipe; the others (``recipes/*.yaml``) are the
configurations of studies such as the depth study of issue 17, so that one command
reproduces each model without the user copying a YAML file out of the package.
"""

from __future__ import annotations

from pathlib import Path

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.reasoning import model as tree_model


def shipped_recipes() -> dict[str, Path]:
    """Recipe name -> YAML path, for the recipes in the package's ``reasoning/recipes``."""
    from importlib import resources

    folder = Path(str(resources.files("mechunlearn.reasoning").joinpath("recipes")))
    if not folder.is_dir():
        return {}
    return {p.name.removesuffix(".yaml"): p for p in sorted(folder.glob("*.yaml"))}


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe YAML path, ``shipped`` (the shipped checkpoint's recipe) or a shipped recipe's
    name; an existing file wins over a name, as for experiment configs."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    if name == tree_model.SHIPPED:
        # looked up on the module, so that a test can point it at another folder
        recipe = tree_model.shipped_checkpoint_folder() / tree_model.SHIPPED_RECIPE
        if not recipe.is_file():
            raise DataError(f"this installation ships no tree recipe ({recipe})")
        return recipe
    recipes = shipped_recipes()
    if name in recipes:
        return recipes[name]
    known = ", ".join([tree_model.SHIPPED, *recipes])
    raise ConfigError(
        f"tree recipe {name!r} is neither a file nor a shipped recipe; shipped: {known}"
    )
