"""``python -m animl_lightning.export checkpoint=CKPT format=onnx|torchscript|animl output=PATH [precision=int8]``.

Settings: ``configs/export.yaml``. The Hydra edge only: the work is the writer of the format's entry in
:data:`animl_lightning.deploy.export_formats.FORMATS` (one model file and its sidecar, or the folder Animl's
endpoints need); bad inputs end the run with one line (exit status 2), never a traceback. With ``precision=int8``
the output ends with the int8 model's top-1 agreement with fp32 and each label's recall change on val; below
``int8.min_agreement`` nothing is written and the one line says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import refuse_unknown_keys, require_extra, run_command
from animl_lightning.core.errors import ConfigError
from animl_lightning.deploy.export_formats import ExportJob, check_format
from animl_lightning.hydra_entry import command_main


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
    """Export the configured checkpoint with the writer of its format and say where it went."""
    refuse_unknown_keys(cfg)
    entry = check_format(str(cfg.format), str(cfg.precision))
    for key in ("checkpoint", "output"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ConfigError(f"{key}: must be set (e.g. {key}=PATH on the command line)")
    require_extra(entry.extra, entry.modules)
    from animl_lightning.deploy.int8_settings import Int8Settings
    from animl_lightning.deploy.onnx_cache import OnnxCache, resolve_cache_dir

    int8 = Int8Settings(**OmegaConf.to_container(cfg.int8, resolve=True))  # type: ignore[arg-type]
    folder = resolve_cache_dir(cfg.cache_dir)
    # A format's own settings are the block of export.yaml named after it (animl:).
    block = OmegaConf.to_container(cfg[entry.name], resolve=True) if entry.name in cfg else {}
    job = ExportJob(
        checkpoint=Path(str(cfg.checkpoint)),
        output=Path(str(cfg.output)),
        format=entry.name,
        precision=str(cfg.precision),
        int8=int8,
        cache=None if folder is None else OnnxCache(folder),
        options={str(key): value for key, value in block.items()} if isinstance(block, dict) else {},
    )
    exported = entry.write(job)
    if exported.int8_report is not None:
        print(int8_table(exported.int8_report))
    print(exported.summary)


@command_main("export", "export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: export(cfg), "export")


if __name__ == "__main__":
    main()
