"""What a checkpoint path is, decided once: `resolve(path)` returns a typed source that the
loaders, the converter and `train.init_from` take as it is, without looking at the path again.

- `HFSource`: a Hugging Face directory (config.json plus model.safetensors or an index);
- `ConvertedSource`: a directory written by `hf_to_orbax` (deepseek_jax.json plus params/);
- `TrainingSource`: a training run directory, its checkpoints/ directory or one step directory
  (for a run, the newest step whose directory is complete; see `training.step_problem`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.checkpoint.mapping import stack_layout
from deepseek_jax.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointReader
from deepseek_jax.checkpoint.training import newest_good_step, read_step_config
from deepseek_jax.config import Config, ConfigError, ModelConfig, config_from_saved, from_hf_config
from deepseek_jax.config import replace as replace_config

log = logging.getLogger(__name__)

FORMAT = "deepseek_jax.converted"
VERSION = 1
META_FILE = "deepseek_jax.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class HFSource:
    path: str
    model: ModelConfig
    hf_config: dict  # config.json as read
    fp8_block: tuple[int, int] | None  # block of FP8 weights (SPEC §6), None when unquantized
    kind = "huggingface"


@dataclasses.dataclass(frozen=True)
class ConvertedSource:
    path: str
    model: ModelConfig
    meta: dict  # deepseek_jax.json
    kind = "converted"

    @property
    def arrays_dir(self) -> str:
        return os.path.join(self.path, PARAMS_DIR)


@dataclasses.dataclass(frozen=True)
class TrainingSource:
    path: str  # the directory the user named
    step_dir: str
    step: int
    config: Config  # the whole Config the run saved with this step
    kind = "training"

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def arrays_dir(self) -> str:
        return os.path.join(self.step_dir, "state")


Source = HFSource | ConvertedSource | TrainingSource


def is_hf_checkpoint(path: str) -> bool:
    """Whether `path` holds HF weights (a run directory also has a config.json, of another kind)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in (SINGLE_FILE, INDEX_FILE)
    )


def resolve(path: str | os.PathLike) -> Source:
    """The checkpoint at `path`; CheckpointError naming the path when it is none of the kinds."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_hf_checkpoint(path):
        return _hf(path)
    if os.path.isfile(os.path.join(path, META_FILE)):
        return _converted(path)
    source = _training(path)
    if source is None:
        raise CheckpointError(
            f"{path} is not a checkpoint: expected a Hugging Face directory (config.json and "
            f"{SINGLE_FILE} or {INDEX_FILE}), a converted directory ({META_FILE}) or a training "
            "run, checkpoints or step directory (<step>/state)"
        )
    return source


def fp8_block(hf: dict) -> tuple[int, int] | None:
    """The FP8 block of config.json's quantization_config, None when there is none."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"unsupported quant_method {method!r} in config.json (only 'fp8')")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"unsupported fp8 fmt {fmt!r} in config.json (only 'e4m3')")
    block = quant.get("weight_block_size", [128, 128])
    if len(block) != 2:
        raise CheckpointError(f"weight_block_size {block} must have two entries")
    return int(block[0]), int(block[1])


def _hf(path: str) -> HFSource:
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    block = fp8_block(hf)
    try:
        cfg = from_hf_config(hf)
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    try:
        with CheckpointReader(path) as reader:
            cfg = _without_absent_mtp(cfg, reader)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return HFSource(path, cfg, hf, block)


def _without_absent_mtp(cfg: ModelConfig, reader: CheckpointReader) -> ModelConfig:
    """config.json may announce MTP layers that the checkpoint lacks (transformers drops them)."""
    probe = f"model.layers.{cfg.num_layers}.eh_proj.weight"
    if cfg.mtp.depth and probe not in reader:
        log.info(
            "config.json has %d MTP layer(s) but %s is absent: loading without MTP",
            cfg.mtp.depth,
            probe,
        )
        cfg = replace_config(cfg, **{"mtp.depth": 0})
    return cfg


def _converted(path: str) -> ConvertedSource:
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise ValueError(f"version {meta.get('version')!r} is not {VERSION}")
        model = config_from_saved({"model": meta["model"]}).model
        layout = meta["layout"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{meta_path} is missing or garbled: {e}") from None
    want = {
        "format": "stacked",
        "layer_kinds": list(model.layer_kinds),
        "stacks": stack_layout(model),
    }
    if layout != want:
        raise CheckpointError(
            f"{meta_path}: layer layout {layout} does not match its model config ({want})"
        )
    return ConvertedSource(path, model, meta)


def _training(path: str) -> TrainingSource | None:
    if os.path.isdir(os.path.join(path, "state")):
        step_dir = path
    else:
        step_dir = None
        for candidate in (os.path.join(path, "checkpoints"), path):
            if os.path.isdir(candidate):
                step = newest_good_step(candidate)
                if step is not None:
                    step_dir = os.path.join(candidate, str(step))
                    break
        if step_dir is None:
            return None
    name = os.path.basename(step_dir)
    step = int(name) if name.isdigit() else -1
    return TrainingSource(path, step_dir, step, read_step_config(step_dir))
