"""Training recipes, `vitlab train --recipe NAME:key=value,...`: re-exported from `vitlab.recipes`, a registry that
sits below the units registering into it (token reduction, quantization, model families), so they need not import
the engine."""
from ..recipes import (_RECIPES, Recipe, RecipeError, Step, format_recipe, parse_recipe, recipe_class,  # noqa: F401
                       recipe_names, register_recipe)

__all__ = ["Recipe", "RecipeError", "Step", "format_recipe", "parse_recipe", "recipe_class", "recipe_names",
           "register_recipe"]
