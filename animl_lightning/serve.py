"""``python -m animl_lightning.serve bundle=DIR host=127.0.0.1 port=8080``: Animl's endpoint contract on this machine.

Settings: ``configs/serve.yaml``. The Hydra edge only: the app is :func:`animl_lightning.deploy.server.create_app`
(FastAPI, ONNX Runtime), served by uvicorn; a bundle that cannot be used ends the command with one line.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import refuse_unknown_keys, require_extra, run_command
from animl_lightning.core.errors import require
from animl_lightning.hydra_entry import command_main

# What serve imports from the deploy extra (pyproject.toml).
SERVE_MODULES = ("uvicorn", "fastapi", "onnxruntime")


def serve(cfg: DictConfig) -> None:
    """Load the bundle and serve it until stopped."""
    refuse_unknown_keys(cfg)
    require(
        not OmegaConf.is_missing(cfg, "bundle") and bool(cfg.bundle),
        "bundle",
        "must be set to a folder written by export format=animl (e.g. bundle=DIR)",
    )
    port = cfg.port
    # uvicorn would fail deep in socket code (OverflowError, ValueError) after loading the model.
    require(
        isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536,
        "port",
        f"must be a whole number from 1 to 65535, got {port!r}",
    )
    require_extra("deploy", SERVE_MODULES)
    import uvicorn

    from animl_lightning.deploy.server import create_app

    app = create_app(str(cfg.bundle), threads=cfg.threads)
    uvicorn.run(
        app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level), access_log=bool(cfg.access_log)
    )


@command_main("serve", "serve")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: serve(cfg), "serve")


if __name__ == "__main__":
    main()
