"""PyTorch interop: load CIFAR-ResNet weights in the common PyTorch layout into ResNetCIFAR.

Key layout (as in shared/peers/torch_resnet_sd.py and most PyTorch CIFAR ResNets): `conv1.weight`,
`bn1.{weight,bias,running_mean,running_var}`, `layer{1,2,3}.{i}.conv{1,2}.weight`,
`layer{1,2,3}.{i}.bn{1,2}.*`, `linear.{weight,bias}`.

    python -m sd_jax.interop --checkpoint model.pth --depth 110 --dataset cifar10 [--p-last 0.5]

evaluates a PyTorch checkpoint with this package's data pipeline and evaluation code.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import cli
from sd_jax.models.cifar import ResNetCIFAR, blocks_per_stage, stack_blocks, to_scanned_layout
from sd_jax.models.imagenet import ResNetImageNet, stage_blocks, stage_sizes

BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
IGNORED_SUFFIXES = (".num_batches_tracked",)


def _to_numpy(value):
    """float32, or float64 when given float64 (for a float64 model under jax_enable_x64)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    value = np.asarray(value)
    return value if value.dtype == np.float64 else value.astype(np.float32)


CONV = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731 - OIHW -> HWIO
SAME = lambda w: w  # noqa: E731


def _add_bn(mapping, torch_prefix, flax_prefix):
    for field, (collection, name) in BN_FIELDS.items():
        mapping[f"{torch_prefix}.{field}"] = (collection, flax_prefix + (name,), SAME)


def _stem_and_head(classifier: str) -> dict:
    mapping = {"conv1.weight": ("params", ("conv1", "kernel"), CONV),
               f"{classifier}.weight": ("params", ("linear", "kernel"), lambda w: w.T),
               f"{classifier}.bias": ("params", ("linear", "bias"), SAME)}
    _add_bn(mapping, "bn1", ("bn1",))
    return mapping


def _torch_to_flax_paths(depth: int):
    """{torch key: (collection, flax path tuple, converter)} for the unrolled ResNetCIFAR layout."""
    mapping = _stem_and_head("linear")
    for s in range(3):
        for i in range(blocks_per_stage(depth)):
            flax_block = (f"stage{s + 1}", f"block{i}", "f")
            for j in (1, 2):
                mapping[f"layer{s + 1}.{i}.conv{j}.weight"] = ("params", flax_block + (f"conv{j}", "kernel"), CONV)
                _add_bn(mapping, f"layer{s + 1}.{i}.bn{j}", flax_block + (f"bn{j}",))
    return mapping


def _torchvision_to_flax_paths(depth: int):
    """The same for torchvision's resnet50/101/152 and the unrolled ResNetImageNet layout."""
    mapping = _stem_and_head("fc")
    for s, n in enumerate(stage_blocks(depth)):
        for i in range(n):
            torch_block, flax_block = f"layer{s + 1}.{i}", (f"layer{s + 1}", f"block{i}")
            for j in (1, 2, 3):
                mapping[f"{torch_block}.conv{j}.weight"] = ("params", flax_block + ("f", f"conv{j}", "kernel"), CONV)
                _add_bn(mapping, f"{torch_block}.bn{j}", flax_block + ("f", f"bn{j}"))
            if i == 0:
                mapping[f"{torch_block}.downsample.0.weight"] = ("params", flax_block + ("skip", "conv", "kernel"), CONV)
                _add_bn(mapping, f"{torch_block}.downsample.1", flax_block + ("skip", "bn"))
    return mapping


def strip_wrappers(state_dict):
    """Accept {"state_dict": ...}/{"net": ...}/{"model": ...} checkpoints and DataParallel "module." keys."""
    for wrapper in ("state_dict", "net", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _variables_from(state_dict, mapping: dict, model, image_size: int, label: str) -> dict:
    """Flax variables for the unrolled `model` from a state_dict, through `mapping`; a ValueError
    lists every missing, unexpected or mis-shaped key."""
    state_dict = strip_wrappers(dict(state_dict))
    given = {k for k in state_dict if not k.endswith(IGNORED_SUFFIXES)}
    missing, unexpected = sorted(set(mapping) - given), sorted(given - set(mapping))
    in_channels = _to_numpy(state_dict["conv1.weight"]).shape[1] if "conv1.weight" in state_dict else 3
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, in_channels)))
    variables = {"params": {}, "batch_stats": {}}
    mis_shaped = []
    for key in sorted(set(mapping) & given):
        collection, path, convert = mapping[key]
        value = convert(_to_numpy(state_dict[key]))
        expected = shapes[collection]
        for name in path:
            expected = expected[name]
        if value.shape != expected.shape:
            mis_shaped.append(f"{key}: got {tuple(value.shape)}, expected {tuple(expected.shape)} after conversion")
            continue
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value)
    problems = [f"{kind}: {items}" for kind, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", mis_shaped)) if items]
    if problems:
        raise ValueError(f"state_dict does not fit {label}; " + "; ".join(problems))
    return variables


def from_torch_state_dict(state_dict, depth: int, num_classes: int = 10, **model_kwargs):
    """Flax variables {"params", "batch_stats"} for ResNetCIFAR(depth, num_classes, **model_kwargs)."""
    model = ResNetCIFAR(depth, num_classes, **{**model_kwargs, "scan_blocks": False})
    variables = _variables_from(state_dict, _torch_to_flax_paths(depth), model, 32,
                                f"ResNet-{depth} with {num_classes} classes")
    return to_scanned_layout(variables, depth) if model_kwargs.get("scan_blocks") else variables


def from_torchvision_state_dict(state_dict, depth: int, num_classes: int = 1000, scan_blocks: bool = False):
    """Flax variables for ResNetImageNet(depth, num_classes, scan_blocks=...) from torchvision's
    resnet50/101/152 weights (`conv1`, `bn1`, `layer{1..4}.{i}.conv{1,2,3}`, `.bn{1,2,3}`,
    `.downsample.{0,1}`, `fc`)."""
    variables = _variables_from(state_dict, _torchvision_to_flax_paths(depth), ResNetImageNet(depth, num_classes),
                                64, f"torchvision ResNet-{depth} with {num_classes} classes")
    return stack_blocks(variables, stage_sizes(depth)) if scan_blocks else variables


def load_torch_checkpoint(path: str):
    import torch

    return strip_wrappers(torch.load(path, map_location="cpu", weights_only=True))


def arg_parser():
    from sd_jax.data import cifar_svhn
    from sd_jax.models.cifar import SHORTCUT_DOWNSAMPLES

    p = cli.parser("Evaluate a PyTorch CIFAR-ResNet checkpoint with sd_jax.")
    p.add_argument("--checkpoint", required=True, help=".pth/.pt file holding a state_dict")
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default="")
    p.add_argument("--data-source", default="tfds", choices=("tfds", "files"))
    p.add_argument("--p-last", type=float, default=1.0, help="survival probability used at training time")
    p.add_argument("--survival-mode", default="linear", choices=("linear", "uniform"))
    p.add_argument("--normalization", default="channel_mean_std", choices=cifar_svhn.NORMALIZATIONS,
                   help="the input normalisation the PyTorch run trained with (default: per channel, "
                        "as transforms.Normalize)")
    p.add_argument("--shortcut-downsample", default="subsample", choices=SHORTCUT_DOWNSAMPLES,
                   help="option-A shortcut: stride-2 subsampling or a 2x2 average")
    return p


def run(args):
    from sd_jax.data import cifar_svhn
    from sd_jax.training import parallel
    from sd_jax.config import default_config, resolve_convention
    from sd_jax.training.experiment import device_eval_data
    from sd_jax.training.feeds import error_rates
    from sd_jax.training.plan import make_model
    from sd_jax.training.steps import make_count_errors

    dataset = cifar_svhn.load_dataset(args.dataset, args.data_dir, args.data_source)
    config = default_config()
    config.update(depth=args.depth, p_last=args.p_last, survival_mode=args.survival_mode, dataset=args.dataset,
                  convention="pytorch", normalization=args.normalization,
                  shortcut_downsample=args.shortcut_downsample)
    resolve_convention(config)
    variables = from_torch_state_dict(load_torch_checkpoint(args.checkpoint), args.depth, dataset.num_classes,
                                      p_last=args.p_last, survival_mode=args.survival_mode,
                                      shortcut_downsample=args.shortcut_downsample)
    mesh = parallel.make_mesh()
    count_errors = make_count_errors(config, make_model(config, dataset.num_classes, mesh), mesh)
    eval_data = device_eval_data(dataset, config.eval_batch_size, mesh,
                                          *dataset.normalization(config.normalization))
    result = {"checkpoint": args.checkpoint, "depth": args.depth, "dataset": args.dataset,
              **error_rates(count_errors, variables, eval_data)}
    print(json.dumps(result))
    return result


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
