"""Recipe schema, parsing and checks."""

from mergecli.recipe.load import load_recipe, parse_recipe
from mergecli.recipe.schema import ModelRef, Recipe

__all__ = ["ModelRef", "Recipe", "load_recipe", "parse_recipe"]
