"""Built-in data sets and small models that ship with retrack and work offline."""

from pathlib import Path

RECIPES = Path(__file__).resolve().parent  # one folder per recipe: YAMLs, shipped model folders
