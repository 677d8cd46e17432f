"""The Hydra configs of every command; a package, installed as ``animl_lightning.configs`` (pyproject.toml).

Being a package lets Hydra compose them by module wherever animl-lightning is installed, e.g. in a notebook:
``hydra.initialize_config_module("animl_lightning.configs")`` or ``config_path="pkg://animl_lightning.configs"``.
Hydra imports this package to read it, so the settings schemas the configs name are registered here, as each
command registers its own before composing.
"""

from animl_lightning.config_schemas import register_all_schemas

register_all_schemas()
