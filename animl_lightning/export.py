"""``python -m animl_lightning.export checkpoint=CKPT format=onnx|torchscript|animl output=PATH [precision=int8]``.

Settings: ``configs/export.yaml``. The Hydra edge only: the work is
:func:`animl_lightning.deploy.export.export_checkpoint` (one model file and its sidecar) or
:func:`animl_lightning.deploy.animl_bundle.export_animl` (the folder Animl's endpoints need); bad inputs end the run
with one line (exit status 2), never a traceback. With ``precision=int8`` the output ends with the int8 model's
top-1 agreement with fp32 and each label's recall change on val; below ``int8.min_agreement`` nothing is written and
the one line says so.
"""

from __future__ import annotations

from typing import Any

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


def int8_table(report: dict[str, Any]) -> str:
    """The agreement line and one row per label: val crops, recall with fp32 and int8, and the change."""
    from animl_lightning.deploy.quantize import describe

    width = max(len("label"), *(len(label) for label in report["recall"]))
    lines = [f"int8: {describe(report)}", f"{'label':<{width}}  {'val crops':>9}  {'fp32':>6}  {'int8':>6}  change"]
    for label, row in report["recall"].items():
        if row["change"] is None:
            lines.append(f"{label:<{width}}  {0:>9}  {'-':>6}  {'-':>6}  -")
            continue
        recall = f"{row['fp32']:>6.4f}  {row['int8']:>6.4f}  {row['change']:+.4f}"
        lines.append(f"{label:<{width}}  {row['support']:>9}  {recall}")
    return "\n".join(lines)


def export(cfg: DictConfig) -> None:
    """Export the configured checkpoint and say where it went."""
    refuse_unknown_keys(cfg)
    require(cfg.format in FORMAT_EXTRAS, "format", f"must be one of {list(FORMAT_EXTRAS)}, got {cfg.format!r}")
    for key in ("checkpoint", "output"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ConfigError(f"{key}: must be set (e.g. {key}=PATH on the command line)")
    extra, modules = FORMAT_EXTRAS[str(cfg.format)]
    require_extra(extra, modules)
    from animl_lightning.deploy.onnx_cache import OnnxCache, resolve_cache_dir
    from animl_lightning.deploy.quantize import Int8Settings

    precision = str(cfg.precision)
    int8 = Int8Settings(**OmegaConf.to_container(cfg.int8, resolve=True))  # type: ignore[arg-type]
    folder = resolve_cache_dir(cfg.cache_dir)
    cache = None if folder is None else OnnxCache(folder)
    if cfg.format == "animl":
        from animl_lightning.deploy.animl_bundle import export_animl

        bundle = export_animl(
            str(cfg.checkpoint),
            str(cfg.output),
            model_id=cfg.animl.model_id,
            version=str(cfg.animl.version),
            description=str(cfg.animl.description or ""),
            threshold=float(cfg.animl.default_threshold),
            precision=precision,
            int8=int8,
            cache=cache,
        )
        if bundle.int8_report is not None:
            print(int8_table(bundle.int8_report))
        models = "ONNX server with fp32 and int8 models" if bundle.int8_report is not None else "ONNX server"
        print(f"wrote {bundle.folder} (TorchServe archive {bundle.mar_file.name}, {models}, mlmodel.json)")
        return
    from animl_lightning.deploy.export import export_checkpoint

    result = export_checkpoint(str(cfg.checkpoint), str(cfg.format), str(cfg.output), precision, int8, cache)
    if result.int8_report is not None:
        print(int8_table(result.int8_report))
    size = "dynamic batch and input size" if result.dynamic_size else "dynamic batch, fixed input size"
    print(f"wrote {result.model_file} ({result.format} {result.precision}, {size}) and {result.sidecar_file}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: export(cfg), "export")


if __name__ == "__main__":
    main()
