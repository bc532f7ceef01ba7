from dpt_scale.recipe.load import dump_recipe, flatten, load_recipe, recipe_dict, save_recipe
from dpt_scale.recipe.schema import Recipe

__all__ = ["Recipe", "dump_recipe", "flatten", "load_recipe", "recipe_dict", "save_recipe"]
