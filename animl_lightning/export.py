"""``python -m animl_lightning.export checkpoint=CKPT format=onnx|torchscript|animl output=PATH``.

Settings: ``configs/export.yaml``. The Hydra edge only: the work is
:func:`animl_lightning.deploy.export.export_checkpoint` (one model file and its sidecar) or
:func:`animl_lightning.deploy.animl_bundle.export_animl` (the folder Animl's endpoints need); bad inputs end the run
with one line (exit status 2), never a traceback.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import CONFIG_DIR, refuse_unknown_keys, require_extra, run_command
from animl_lightning.core.errors import ConfigError, require

# Every format= (the model files of deploy.export, and the animl folder) and what each imports from which extra.
FORMAT_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnx": ("export", ("onnx", "onnxscript", "onnxruntime")),
    "torchscript": ("", ()),
    "animl": ("deploy", ("onnx", "onnxscript", "onnxruntime", "model_archiver")),
}


def export(cfg: DictConfig) -> None:
    """Export the configured checkpoint and say where it went."""
    refuse_unknown_keys(cfg)
    require(cfg.format in FORMAT_EXTRAS, "format", f"must be one of {list(FORMAT_EXTRAS)}, got {cfg.format!r}")
    for key in ("checkpoint", "output"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ConfigError(f"{key}: must be set (e.g. {key}=PATH on the command line)")
    extra, modules = FORMAT_EXTRAS[str(cfg.format)]
    require_extra(extra, modules)
    if cfg.format == "animl":
        from animl_lightning.deploy.animl_bundle import export_animl

        bundle = export_animl(
            str(cfg.checkpoint),
            str(cfg.output),
            model_id=cfg.animl.model_id,
            version=str(cfg.animl.version),
            description=str(cfg.animl.description or ""),
            threshold=float(cfg.animl.default_threshold),
        )
        print(f"wrote {bundle.folder} (TorchServe archive {bundle.mar_file.name}, ONNX server, mlmodel.json)")
        return
    from animl_lightning.deploy.export import export_checkpoint

    result = export_checkpoint(str(cfg.checkpoint), str(cfg.format), str(cfg.output))
    size = "dynamic batch and input size" if result.dynamic_size else "dynamic batch, fixed input size"
    print(f"wrote {result.model_file} ({result.format}, {size}) and {result.sidecar_file}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: export(cfg), "export")


if __name__ == "__main__":
    main()
