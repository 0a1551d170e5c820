"""The experiment configuration: defaults (the paper's CIFAR recipe), config files and validation."""
import difflib
import importlib.util
import os

import ml_collections
from absl import flags
from ml_collections import config_flags

from sd_jax.layers.conv import CONV_GRADS
from sd_jax.layers.initializers import INIT_FANS
from sd_jax.data.cifar_svhn import NORMALIZATIONS
from sd_jax.models.cifar import BN_SCALE_INITS, CLASSIFIER_INITS, SHORTCUT_DOWNSAMPLES, blocks_per_stage
from sd_jax.models.imagenet import stage_blocks
from sd_jax.layers.survival import SURVIVAL_MODES
from sd_jax.layers.stochastic_depth import DROP_MODES

DTYPES = ("float32", "bfloat16")
DROP_GATES = ("shared", "per_device")
# "resnet_cifar": the paper's CIFAR/SVHN ResNet (depth 6n+2, basic blocks); "resnet_imagenet": the
# bottleneck ResNet-50/101/152 of the paper's ImageNet run and composer (sd_jax.models.imagenet).
MODEL_DEPTHS = {"resnet_cifar": blocks_per_stage, "resnet_imagenet": stage_blocks}
LR_SCHEDULES = ("step", "cosine")
LR_WARMUPS = ("constant", "linear")
# Datasets fed from the host (too large for the device): sd_jax.data.imagenet and sd_jax.data.input_pipeline.
HOST_FED_DATASETS = ("imagenet2012",)
DATA_SOURCES = {"tfds": "tensorflow-datasets", "files": "the official files (ImageNet: an ImageFolder) in data_dir",
                "synthetic": "generated JPEGs, imagenet2012 only"}


# Where the paper is silent, whose conventions to follow (docs/fidelity.md). "authors": the
# authors' Torch code as of the paper (yueatsprograms/Stochastic_Depth, commits up to 86b5cdd);
# "pytorch": what PyTorch CIFAR-ResNet reimplementations usually do (torchvision init, per-channel
# transforms.Normalize, a DataLoader that keeps the last partial batch).
CONVENTIONS = {
    "authors": {"bn_scale_init": "uniform", "conv_init_fan": "fan_in", "classifier_init": "torch",
                "shortcut_downsample": "subsample", "normalization": "pixel_mean_scalar_std",
                "partial_last_batch": True},
    "pytorch": {"bn_scale_init": "ones", "conv_init_fan": "fan_out", "classifier_init": "torch",
                "shortcut_downsample": "subsample", "normalization": "channel_mean_std",
                "partial_last_batch": True},
}
CONVENTION_CHOICES = {"bn_scale_init": BN_SCALE_INITS, "conv_init_fan": INIT_FANS,
                      "classifier_init": CLASSIFIER_INITS, "shortcut_downsample": SHORTCUT_DOWNSAMPLES,
                      "normalization": NORMALIZATIONS, "partial_last_batch": (True, False)}


class ConfigError(ValueError):
    """A config key or value that cannot be run; the message says which and how to fix it."""


def default_config() -> ml_collections.ConfigDict:
    """ResNet-110, stochastic depth p_L=0.5 linear, the paper's CIFAR-10 training recipe."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_source = "tfds"  # "tfds" (downloads and prepares) or "files" (the official files in data_dir)
    c.data_dir = ""  # "" -> tfds's default (~/tensorflow_datasets)
    c.image_size = 224  # imagenet2012: the side of the training crops and evaluation images
    c.synthetic_images = (10000, 1000)  # imagenet2012, data_source="synthetic": (train, val) images
    c.data_threads = 0  # imagenet2012: tf.data's decoding threads (0: tf.data decides)
    c.model = "resnet_cifar"  # or "resnet_imagenet" (bottleneck ResNet-50/101/152)
    c.depth = 110
    c.num_classes = ml_collections.FieldReference(None, field_type=int)  # None -> from the dataset
    c.p_last = 0.5  # survival probability of the last block; 1.0 = constant depth
    c.survival_mode = "linear"  # "linear" decay or "uniform"
    c.drop_mode = "block"  # "block" (the paper, skips compute) or "sample" (drop path)
    c.drop_gates = "shared"  # several devices: all skip the same blocks ("shared") or draw their own
    c.drop_warmup = 0.0  # fraction of training over which the drop rate ramps up from 0
    # resnet_imagenet only: False keeps the 4 projection blocks always on; True (the paper, composer) drops them too
    c.drop_downsample_blocks = True
    c.zero_init_last_bn = False  # resnet_imagenet only: each branch's last BN scale starts at 0 (Goyal et al.)
    c.convention = "authors"  # "authors" (their Torch code) or "pytorch": the defaults of the six keys below
    c.bn_scale_init = ml_collections.FieldReference(None, field_type=str)  # "uniform" in [0, 1) or "ones"
    c.conv_init_fan = ml_collections.FieldReference(None, field_type=str)  # He init over "fan_in" or "fan_out"
    c.classifier_init = ml_collections.FieldReference(None, field_type=str)  # "torch" (+-1/sqrt(fan_in)) or "lecun"
    c.shortcut_downsample = ml_collections.FieldReference(None, field_type=str)  # "subsample" or "average"
    c.normalization = ml_collections.FieldReference(None, field_type=str)  # see sd_jax.data.cifar_svhn.NORMALIZATIONS
    c.partial_last_batch = ml_collections.FieldReference(None, field_type=bool)  # train the epoch's last, short batch
    c.num_epochs = 500
    c.batch_size = 128
    c.learning_rate = 0.1
    c.lr_schedule = "step"  # "step" (lr_boundaries, lr_decay) or "cosine" (to 0 at the end, after the warm-up)
    c.lr_boundaries = (250, 375)  # step: 1-based epochs at whose start the learning rate is multiplied by lr_decay
    c.lr_decay = 0.1
    c.lr_warmup_epochs = 0  # epochs of warm-up before learning_rate
    # "constant": lr_warmup_value throughout the warm-up (He et al. for ResNet-1202); "linear": step by
    # step from lr_warmup_value to learning_rate (Goyal et al.)
    c.lr_warmup = "constant"
    c.lr_warmup_value = 0.01
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.seed = 0
    c.dtype = "float32"  # compute dtype; parameters are always float32
    # nn.scan over identical blocks: flat compile time in depth. None: on for the CIFAR ResNets on
    # TPU, off elsewhere (resolve_platform_defaults)
    c.scan_blocks = ml_collections.FieldReference(None, field_type=bool)
    c.conv_grads = "auto"  # resnet_cifar: "explicit" conv backward (fast inside lax.cond on CPU) or "xla"
    c.augment_translate = ml_collections.FieldReference(None, field_type=int)  # px; None -> dataset default
    c.augment_flip = ml_collections.FieldReference(None, field_type=bool)  # None -> dataset default
    # ImageNet only, on the device after the host's crop (fb.resnet.torch, datasets/imagenet.lua):
    c.color_jitter = 0.0  # brightness, contrast and saturation factors 1 + U(-x, x) in random order (paper: 0.4)
    c.lighting_std = 0.0  # AlexNet PCA lighting: N(0, x) per principal component (paper: 0.1)
    c.steps_per_call = 50  # training steps per jitted call
    c.eval_batch_size = 1000
    c.eval_every_steps = 0  # 0: evaluate after every epoch; N: every N training steps (the authors' SVHN: 200)
    c.checkpoint_every_epochs = 1
    c.profile_steps = 0  # N > 0: trace the first N training steps after compilation into <workdir>/profile/
    # JAX's persistent compilation cache: a second start of the same run skips XLA compilation.
    # "" turns it off; JAX_COMPILATION_CACHE_DIR, when set, is used instead.
    c.compilation_cache_dir = "~/.cache/sd_jax/jax"
    return c


def _config_dir() -> str:
    """The experiment configs: the repository's top-level configs/, which the wheel ships as the
    package sd_jax.configs (pyproject's package-dir), so that an installed sd_jax (Colab) finds them too."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    if os.path.isdir(checkout):
        return checkout
    spec = importlib.util.find_spec("sd_jax.configs")
    return os.path.dirname(spec.origin) if spec and spec.origin else checkout


CONFIG_DIR = _config_dir()


def config_names() -> list:
    """The experiments in configs/ (one file each)."""
    return sorted(name[:-3] for name in os.listdir(CONFIG_DIR) if name.endswith(".py") and not name.startswith("_"))


def config_path(name_or_path: str) -> str:
    """A config file: the path of a .py file, or the name of one in configs/ ("quickstart")."""
    if name_or_path.endswith(".py") and os.path.isfile(name_or_path):
        return name_or_path
    packaged = os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    if os.path.sep not in name_or_path and os.path.isfile(packaged):
        return packaged
    raise ConfigError(f"no config file {name_or_path!r}; give the path of a .py file whose get_config() returns "
                      f"a ConfigDict, or the name of one in configs/: {', '.join(config_names())}")


def base_config(name: str) -> ml_collections.ConfigDict:
    """The ConfigDict of another experiment in configs/, for a config that builds on it (the
    constant-depth twin of a stochastic-depth config); works in a checkout and when installed."""
    spec = importlib.util.spec_from_file_location(f"sd_jax_config_{name}", config_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_config(name_or_path: str, overrides=()) -> ml_collections.ConfigDict:
    """The ConfigDict of a config file (see `config_path`) with command-line overrides such as
    "--config.depth=56" applied, parsed as ml_collections' config flags parse them (train.py's
    `--config.KEY=VALUE`). Notebooks call it with the file alone and set what they change."""
    path = config_path(name_or_path)
    argv = ["sd_jax", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    try:
        flag_values(argv)
        return flag_values.config
    except (AttributeError, KeyError):  # an override names a key the config lacks
        known = sorted(default_config().keys())
        names = [arg.split("=")[0].removeprefix("--config.").split(".")[0] for arg in overrides]
        key = next((name for name in names if name not in known), " ".join(overrides))
        hint = "".join(f" (did you mean {match!r}?)" for match in difflib.get_close_matches(key, known, n=1))
        raise ConfigError(f"unknown config key {key!r}{hint}; known keys: {known}") from None
    except flags.Error as e:
        raise ConfigError(f"{e} (override a config key as --config.KEY=VALUE)") from None
    except Exception as e:  # the config file itself fails to import or run
        raise ConfigError(f"config file {path} could not be loaded: {type(e).__name__}: {e}") from None


def resolve_convention(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Set every convention key left at None from `config.convention`, in place (idempotent), so
    config.json records what ran; returns `config`."""
    for key, value in CONVENTIONS[config.convention].items():
        if config[key] is None:
            config[key] = value
    return config


def resolve_platform_defaults(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
    """Set the keys whose default depends on the accelerator (`platform`: "cpu", "gpu", "tpu") and
    that were left at None, in place (idempotent); returns `config`. docs/performance.md has the
    measurements behind each."""
    if config.scan_blocks is None:
        # Scanned on TPU for the deep CIFAR ResNets (ResNet-110 on v5e: half the compile time, 0.7x
        # the memory); unrolled for the bottleneck ResNets (composer's ResNet-50 on v5e: 0.75x the
        # memory scanned, stochastic and constant alike) and on every other platform.
        config.scan_blocks = platform == "tpu" and config.model == "resnet_cifar"
    return config


def _require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, known_datasets, num_devices: int = 1) -> None:
    """Raise ConfigError naming the first unknown key or bad value, with the accepted values."""
    unknown = sorted(set(config.keys()) - set(default_config().keys()))
    _require(not unknown, f"unknown config key(s) {unknown}; known keys: {sorted(default_config().keys())}")
    datasets = tuple(known_datasets) + HOST_FED_DATASETS
    _require(config.dataset in datasets, f"dataset={config.dataset!r} is not available; choose one of {sorted(datasets)}")
    _require(config.data_source in DATA_SOURCES,
             f"data_source={config.data_source!r} must be one of {DATA_SOURCES}")
    host_fed = config.dataset in HOST_FED_DATASETS
    _require(host_fed or config.data_source != "synthetic",
             f"data_source='synthetic' generates ImageNet-like JPEGs; for dataset={config.dataset!r} use 'tfds' or 'files'")
    _require(not host_fed or config.model == "resnet_imagenet",
             f"dataset={config.dataset!r} trains the bottleneck ResNets: set model='resnet_imagenet' (and depth 50/101/152)")
    _require(not host_fed or config.partial_last_batch is False,
             f"dataset={config.dataset!r} drops the epoch's last, short batch: set partial_last_batch=False")
    _require(isinstance(config.image_size, int) and config.image_size >= 32,
             f"image_size={config.image_size} must be an integer >= 32 pixels")
    _require(len(config.synthetic_images) == 2 and min(config.synthetic_images) >= 1,
             f"synthetic_images={config.synthetic_images} must be (train, val) image counts >= 1")
    _require(config.data_threads >= 0, f"data_threads={config.data_threads} must be >= 0 (0: tf.data decides)")
    _require(config.model in MODEL_DEPTHS, f"model={config.model!r} must be one of {tuple(MODEL_DEPTHS)}")
    try:
        MODEL_DEPTHS[config.model](config.depth)
    except ValueError as e:
        raise ConfigError(f"depth={config.depth} (model={config.model!r}): {e}") from None
    _require(0.0 < config.p_last <= 1.0,
             f"p_last={config.p_last} must lie in (0, 1] (1.0 = constant depth, the paper uses 0.5)")
    _require(config.survival_mode in SURVIVAL_MODES,
             f"survival_mode={config.survival_mode!r} must be one of {SURVIVAL_MODES}")
    _require(config.drop_mode in DROP_MODES, f"drop_mode={config.drop_mode!r} must be one of {DROP_MODES}")
    _require(config.drop_gates in DROP_GATES, f"drop_gates={config.drop_gates!r} must be one of {DROP_GATES}")
    _require(0.0 <= config.drop_warmup < 1.0, f"drop_warmup={config.drop_warmup} must lie in [0, 1)")
    _require(config.convention in CONVENTIONS,
             f"convention={config.convention!r} must be one of {tuple(CONVENTIONS)} (docs/fidelity.md)")
    for key, choices in CONVENTION_CHOICES.items():
        _require(config[key] is None or config[key] in choices,
                 f"{key}={config[key]!r} must be one of {choices} (or None: the {config.convention!r} convention's)")
    _require(isinstance(config.num_epochs, int) and config.num_epochs >= 1,
             f"num_epochs={config.num_epochs} must be a positive integer")
    _require(config.batch_size >= 1, f"batch_size={config.batch_size} must be a positive integer")
    _require(config.learning_rate > 0, f"learning_rate={config.learning_rate} must be positive")
    _require(config.lr_schedule in LR_SCHEDULES, f"lr_schedule={config.lr_schedule!r} must be one of {LR_SCHEDULES}")
    _require(config.lr_warmup in LR_WARMUPS, f"lr_warmup={config.lr_warmup!r} must be one of {LR_WARMUPS}")
    bounds = list(config.lr_boundaries)
    _require(config.lr_schedule == "step" or not bounds,
             f"lr_boundaries={tuple(bounds)} mean nothing to lr_schedule='cosine'; set lr_boundaries=() "
             "(on the command line: --config.lr_boundaries='()')")
    _require(config.lr_warmup_epochs < config.num_epochs,
             f"lr_warmup_epochs={config.lr_warmup_epochs} must be fewer than num_epochs={config.num_epochs}")
    _require(all(isinstance(b, int) and b > 1 for b in bounds) and bounds == sorted(set(bounds)),
             f"lr_boundaries={tuple(bounds)} must be strictly increasing epochs >= 2 (1-based: the learning rate "
             "drops at the start of each), e.g. (250, 375)")
    _require(config.lr_warmup_epochs >= 0 and (config.lr_warmup_value > 0 or config.lr_warmup == "linear"
                                                and config.lr_warmup_value == 0),
             f"lr_warmup_epochs={config.lr_warmup_epochs} must be >= 0 and lr_warmup_value="
             f"{config.lr_warmup_value} > 0 (0 allowed for a linear warm-up)")
    _require(not bounds or config.lr_warmup_epochs < bounds[0] - 1,
             f"lr_warmup_epochs={config.lr_warmup_epochs} must end before the first lr drop, at the start of "
             f"epoch {bounds[0] if bounds else '-'}")
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
    for key in ("color_jitter", "lighting_std"):
        _require(config[key] >= 0, f"{key}={config[key]} must be >= 0 (0: off)")
        _require(not config[key] or host_fed, f"{key}={config[key]} applies to ImageNet's pipeline only "
                 f"(dataset {HOST_FED_DATASETS}); set it to 0 for {config.dataset!r}")
    _require(config.profile_steps >= 0, f"profile_steps={config.profile_steps} must be >= 0 (0: no profile)")
    _require(config.eval_batch_size >= 1, f"eval_batch_size={config.eval_batch_size} must be >= 1")
    _require(isinstance(config.eval_every_steps, int) and config.eval_every_steps >= 0,
             f"eval_every_steps={config.eval_every_steps} must be 0 (after every epoch) or a positive step count")
    for key in ("batch_size", "eval_batch_size"):
        _require(config[key] % num_devices == 0,
                 f"{key}={config[key]} is not divisible by the {num_devices} devices: every device takes an "
                 f"equal share of each batch, so use a multiple of {num_devices}")
    _require(config.num_classes is None or config.num_classes >= 2,
             f"num_classes={config.num_classes} must be >= 2 (or None to take it from the dataset)")
