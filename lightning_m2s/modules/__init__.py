"""LightningModules: the paper's three training variants and two training-free baselines."""

from lightning_m2s.errors import ConfigError, ModelError
from lightning_m2s.config import defaults
from lightning_m2s.modules.base import Evaluator, StereoModule, eval_steps  # noqa: F401 - the modules API
from lightning_m2s.modules.baselines import ClassicalFillModule, WarpOnlyModule
from lightning_m2s.modules.end_to_end import EndToEndModule
from lightning_m2s.modules.latent_only import LatentOnlyModule
from lightning_m2s.modules.standard_diffusion import StandardDiffusionModule

MODULES = {
    "standard_diffusion": StandardDiffusionModule,  # Eq. 1
    "latent_only": LatentOnlyModule,  # Eq. 2
    "end_to_end": EndToEndModule,  # Eq. 5, the paper's model
    "warp_only": WarpOnlyModule,
    "classical_fill": ClassicalFillModule,
}


def module_class(name: str) -> type[Evaluator]:
    if name not in MODULES:
        raise ConfigError(f"module.variant {name!r} is unknown; choose from {sorted(MODULES)}")
    return MODULES[name]


def read_checkpoint(checkpoint: str, map_location: str = "cpu") -> dict:
    """A lightning_m2s training checkpoint as a dict (state_dict, hyper_parameters, ...), with clear errors."""
    from pathlib import Path

    import torch

    path = Path(checkpoint)
    if path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir()):  # DeepSpeed's sharded folder
        raise ModelError(
            f"checkpoint {path} is a DeepSpeed folder: convert it once with lightning's "
            f"convert_zero_checkpoint_to_fp32_state_dict('{path}', '{path}.fp32.ckpt') and pass that file"
        )
    if path.is_dir():
        raise ModelError(f"checkpoint {path} is a folder, not a checkpoint file: pass a training checkpoint "
                         "(.ckpt, e.g. outputs/<experiment>/<run>/checkpoints/best.ckpt)")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:  # weights_only: tensors and builtin containers only, so a crafted checkpoint never runs code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not a checkpoint
        raise ModelError(f"checkpoint {path} cannot be read as a weights-only checkpoint (it is corrupt, or it "
                         f"holds objects other than tensors and containers, which are never unpickled): {err}") from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or "model" not in hparams or "state_dict" not in ckpt:
        raise ModelError(f"{path} is not a lightning_m2s training checkpoint (no model hyper-parameters)")
    return ckpt


def load_trained_weights(model, state: dict, source: str) -> None:
    """Load a checkpoint's `model.*` weights into a StereoRefiner: every trained (UNet) weight must be
    there, frozen ones may be absent (the config's pretrained directory provides them)."""
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches, e.g. conv_in of 13 vs 9 channels
        raise ModelError(f"{source}: weights do not fit this model config: {err}") from err
    trained_missing = [k for k in missing if k.startswith("unet.")]
    if trained_missing or unexpected:
        raise ModelError(f"{source}: weights do not match the model (missing {trained_missing[:3]}, unexpected {unexpected[:3]})")


def load_refiner(checkpoint: str, map_location: str = "cpu"):
    """The trained StereoRefiner of a checkpoint (any variant) and the module's eval settings: the model is
    rebuilt from the checkpoint's hyper_parameters, then its weights are loaded."""
    from lightning_m2s.models.refiner import build_refiner

    ckpt = read_checkpoint(checkpoint, map_location)
    hparams = ckpt["hyper_parameters"]
    refiner = build_refiner(**(hparams["model"] or {}))
    load_trained_weights(refiner, ckpt["state_dict"], str(checkpoint))
    settings = {**defaults("module.eval"), **(hparams.get("eval") or {})}
    settings["steps"] = eval_steps(settings["steps"])[0]  # inference uses the first of a tested list
    return refiner.eval(), settings
