"""``python -m animl_lightning.serve bundle=DIR host=127.0.0.1 port=8080``: Animl's endpoint contract on this machine.

Settings: ``configs/serve.yaml``. The Hydra edge only: the app is :func:`animl_lightning.deploy.server.create_app`
(FastAPI, ONNX Runtime), served by uvicorn; a bundle that cannot be used ends the command with one line.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import CONFIG_DIR, run_command
from animl_lightning.core.errors import ConfigError


def serve(cfg: DictConfig) -> None:
    """Load the bundle and serve it until stopped."""
    import uvicorn

    from animl_lightning.deploy.server import create_app

    if OmegaConf.is_missing(cfg, "bundle") or not cfg.bundle:
        raise ConfigError("bundle: must be set to a folder written by export format=animl (e.g. bundle=DIR)")
    app = create_app(str(cfg.bundle), threads=cfg.threads)
    uvicorn.run(
        app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level), access_log=bool(cfg.access_log)
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: serve(cfg), "serve")


if __name__ == "__main__":
    main()
