"""The experiment configuration: defaults (the paper's CIFAR recipe) and validation."""
import ml_collections

from sd_jax.conv import CONV_GRADS
from sd_jax.models import blocks_per_stage
from sd_jax.schedules import SURVIVAL_MODES
from sd_jax.stochastic_depth import DROP_MODES

DTYPES = ("float32", "bfloat16")
DROP_GATES = ("shared", "per_device")


class ConfigError(ValueError):
    """A config key or value that cannot be run; the message says which and how to fix it."""


def default_config() -> ml_collections.ConfigDict:
    """ResNet-110, stochastic depth p_L=0.5 linear, the paper's CIFAR-10 training recipe."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_source = "tfds"  # "tfds" (downloads and prepares) or "files" (the official files in data_dir)
    c.data_dir = ""  # "" -> tfds's default (~/tensorflow_datasets)
    c.depth = 110
    c.num_classes = ml_collections.FieldReference(None, field_type=int)  # None -> from the dataset
    c.p_last = 0.5  # survival probability of the last block; 1.0 = constant depth
    c.survival_mode = "linear"  # "linear" decay or "uniform"
    c.drop_mode = "block"  # "block" (the paper, skips compute) or "sample" (drop path)
    c.drop_gates = "shared"  # several devices: all skip the same blocks ("shared") or draw their own
    c.drop_warmup = 0.0  # fraction of training over which the drop rate ramps up from 0
    c.num_epochs = 500
    c.batch_size = 128
    c.learning_rate = 0.1
    c.lr_boundaries = (250, 375)  # epochs at which the learning rate is multiplied by lr_decay
    c.lr_decay = 0.1
    c.lr_warmup_epochs = 0  # epochs at lr_warmup_value before learning_rate (He et al. for ResNet-1202)
    c.lr_warmup_value = 0.01
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.seed = 0
    c.dtype = "float32"  # compute dtype; parameters are always float32
    c.scan_blocks = False  # nn.scan over identical blocks: flat compile time in depth
    c.conv_grads = "auto"  # "explicit" conv backward (fast inside lax.cond on CPU) or "xla"
    c.augment_translate = ml_collections.FieldReference(None, field_type=int)  # px; None -> dataset default
    c.augment_flip = ml_collections.FieldReference(None, field_type=bool)  # None -> dataset default
    c.steps_per_call = 50  # training steps per jitted call
    c.eval_batch_size = 1000
    c.checkpoint_every_epochs = 1
    return c


def _require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, known_datasets, num_devices: int = 1) -> None:
    """Raise ConfigError naming the first unknown key or bad value, with the accepted values."""
    unknown = sorted(set(config.keys()) - set(default_config().keys()))
    _require(not unknown, f"unknown config key(s) {unknown}; known keys: {sorted(default_config().keys())}")
    _require(config.dataset in known_datasets,
             f"dataset={config.dataset!r} is not available; choose one of {sorted(known_datasets)}")
    _require(config.data_source in ("tfds", "files"),
             f"data_source={config.data_source!r} must be 'tfds' or 'files' (the official files in data_dir)")
    try:
        blocks_per_stage(config.depth)
    except ValueError as e:
        raise ConfigError(f"depth={config.depth}: {e}") from None
    _require(0.0 < config.p_last <= 1.0,
             f"p_last={config.p_last} must lie in (0, 1] (1.0 = constant depth, the paper uses 0.5)")
    _require(config.survival_mode in SURVIVAL_MODES,
             f"survival_mode={config.survival_mode!r} must be one of {SURVIVAL_MODES}")
    _require(config.drop_mode in DROP_MODES, f"drop_mode={config.drop_mode!r} must be one of {DROP_MODES}")
    _require(config.drop_gates in DROP_GATES, f"drop_gates={config.drop_gates!r} must be one of {DROP_GATES}")
    _require(0.0 <= config.drop_warmup < 1.0, f"drop_warmup={config.drop_warmup} must lie in [0, 1)")
    _require(isinstance(config.num_epochs, int) and config.num_epochs >= 1,
             f"num_epochs={config.num_epochs} must be a positive integer")
    _require(config.batch_size >= 1, f"batch_size={config.batch_size} must be a positive integer")
    _require(config.learning_rate > 0, f"learning_rate={config.learning_rate} must be positive")
    bounds = list(config.lr_boundaries)
    _require(all(isinstance(b, int) and b > 0 for b in bounds) and bounds == sorted(set(bounds)),
             f"lr_boundaries={tuple(bounds)} must be strictly increasing positive epochs, e.g. (250, 375)")
    _require(config.lr_warmup_epochs >= 0 and config.lr_warmup_value > 0,
             f"lr_warmup_epochs={config.lr_warmup_epochs} must be >= 0 and lr_warmup_value="
             f"{config.lr_warmup_value} > 0")
    _require(not bounds or config.lr_warmup_epochs < bounds[0],
             f"lr_warmup_epochs={config.lr_warmup_epochs} must end before the first lr boundary {bounds[:1]}")
    _require(0.0 < config.lr_decay <= 1.0, f"lr_decay={config.lr_decay} must lie in (0, 1]")
    _require(0.0 <= config.momentum < 1.0, f"momentum={config.momentum} must lie in [0, 1)")
    _require(config.weight_decay >= 0, f"weight_decay={config.weight_decay} must be >= 0")
    _require(config.dtype in DTYPES, f"dtype={config.dtype!r} must be one of {DTYPES}")
    _require(config.conv_grads in CONV_GRADS, f"conv_grads={config.conv_grads!r} must be one of {CONV_GRADS}")
    _require(config.augment_translate is None or config.augment_translate >= 0,
             f"augment_translate={config.augment_translate} must be >= 0 pixels (or None for the dataset default)")
    _require(config.steps_per_call >= 1, f"steps_per_call={config.steps_per_call} must be >= 1")
    _require(config.checkpoint_every_epochs >= 1,
             f"checkpoint_every_epochs={config.checkpoint_every_epochs} must be >= 1")
    _require(config.eval_batch_size >= 1, f"eval_batch_size={config.eval_batch_size} must be >= 1")
    for key in ("batch_size", "eval_batch_size"):
        _require(config[key] % num_devices == 0,
                 f"{key}={config[key]} is not divisible by the {num_devices} devices: every device takes an "
                 f"equal share of each batch, so use a multiple of {num_devices}")
    _require(config.num_classes is None or config.num_classes >= 2,
             f"num_classes={config.num_classes} must be >= 2 (or None to take it from the dataset)")
