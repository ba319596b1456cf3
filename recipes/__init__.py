"""The shipped recipes: plain YAML files to read and copy. Installed, this folder is the package
qlora_kit.recipe_files (see pyproject.toml), which `qlora-kit recipes` and `--recipe NAME` read."""
