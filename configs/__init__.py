"""The Hydra configs of every command; a package, installed as ``animl_lightning.configs`` (pyproject.toml).

Being a package lets Hydra compose them by module wherever animl-lightning is installed, e.g. in a notebook:
``hydra.initialize_config_module("animl_lightning.configs")`` or ``config_path="pkg://animl_lightning.configs"``.
"""
