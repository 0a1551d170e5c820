"""Benchmark the real jitted training step: constant depth vs stochastic depth (and a PyTorch peer).

    python -m sd_jax.bench [--model resnet_cifar|resnet_imagenet] [--depth 110] [--batch-size 128]
        [--image-size 32] [--p-last P] [--steps 3] [--rounds 5] [--dtype float32]
        [--peer torch [--peer-channels-last]] [--scan-blocks [off|on|both]]
        [--conv-grads auto|explicit|xla] [--compiler-options project|none|both] [--batch-mask on|off|both]

Each configuration is compiled, warmed up, then timed in rounds; every round times each
configuration once, alternately, so drifts of a noisy machine hit them all alike. The data are
random images on the device, so the step is timed without an input pipeline. Prints one JSON
object per configuration and a final summary object, with the ratio expected from multiply-adds.
"""
import argparse
import datetime
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import cli

from sd_jax.training import compiler, parallel, provenance
from sd_jax.config import MODEL_DEPTHS, ConfigError, default_config, resolve_convention
from sd_jax.training.plan import initial_state, make_model, make_plan, run_keys
from sd_jax.training.steps import make_train_steps

# The stochastic configuration's p_L when --p-last is not given: the paper's 0.5 (CIFAR, ResNet-152)
# and composer's drop rates 0.2 / 0.4 for ResNet-50 / 101.
DEFAULT_P_LAST = {"resnet_cifar": {}, "resnet_imagenet": {50: 0.8, 101: 0.6, 152: 0.5}}
DEFAULTS = {"resnet_cifar": {"depth": 110, "image_size": 32, "num_classes": 10, "translate": 4},
            "resnet_imagenet": {"depth": 50, "image_size": 224, "num_classes": 1000, "translate": 0}}
CONFIGURATIONS = ("constant", "stochastic", "floor")  # floor: every block dropped (uniform p_L = 0)
PEER_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers", "torch_resnet_sd.py")


def expected_step_ratio(model, image_size=None) -> float:
    """Expected compute of a step of `model` relative to the same network at constant depth: each
    branch's multiply-adds weighted by its survival probability (the stem, projections and head
    always run)."""
    costs, fixed = model.block_macs() if image_size is None else model.block_macs(image_size)
    return float((fixed + model.survival_probabilities() @ costs) / (fixed + costs.sum()))


def random_train_data(num_images: int, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8),
            "labels": rng.integers(0, num_classes, num_images, dtype=np.int32),
            "mean": np.full((3,), 0.5, np.float32), "std": np.full((3,), 0.25, np.float32)}


def configuration(name: str, args) -> tuple:
    """(p_last, survival mode) of a configuration."""
    return {"constant": (1.0, "linear"), "stochastic": (args.p_last, "linear"), "floor": (0.0, "uniform")}[name]


def bench_config(args, p_last: float, mode: str, batch_mask: bool = True, scan_blocks: bool = False):
    """The training config of one timed variant (one epoch of `args.steps` steps)."""
    config = default_config()
    config.update(model=args.model, depth=args.depth, batch_size=args.batch_size, p_last=p_last,
                  survival_mode=mode, dtype=args.dtype, scan_blocks=scan_blocks, conv_grads=args.conv_grads,
                  partial_last_batch=batch_mask, num_epochs=1)
    return resolve_convention(config)


class JaxStep:
    """The training loop's own jitted multi-step function, on random images of the model's input size."""

    def __init__(self, args, p_last: float, mode: str, batch_mask: bool = True, scan_blocks: bool = False):
        config = bench_config(args, p_last, mode, batch_mask, scan_blocks)
        self.steps = args.steps
        mesh = parallel.make_mesh()
        num_train = args.batch_size * args.steps  # one epoch of `steps` steps
        defaults = DEFAULTS[args.model]
        self.train_data = parallel.replicate(
            random_train_data(num_train, args.image_size, defaults["num_classes"]), mesh)
        plan = make_plan(config, num_train, defaults["num_classes"], defaults["translate"], flip=True,
                                  mesh=mesh)
        keys = run_keys(0)
        self.state = parallel.replicate(initial_state(keys["init"], plan, (args.image_size, args.image_size, 3)), mesh)
        self.keys = parallel.replicate(keys, mesh)
        self.perm = jnp.arange(args.batch_size * args.steps)
        start = time.perf_counter()
        self.fn = make_train_steps(plan, config).lower(
            self.state, self.train_data, self.keys, self.perm, 0, self.steps).compile()
        self.compile_s = time.perf_counter() - start
        self.run()  # warm-up

    def run(self) -> float:
        """Seconds per step of one call running `steps` steps."""
        start = time.perf_counter()
        self.state, sums = self.fn(self.state, self.train_data, self.keys, self.perm, 0, self.steps)
        jax.block_until_ready(sums)
        return (time.perf_counter() - start) / self.steps


class TorchStep:
    """The PyTorch eager peer from shared/peers, timed step by step on the GPU if there is one.

    `--dtype bfloat16` runs it under bf16 autocast; `--peer-channels-last` in NHWC memory format.
    """

    def __init__(self, args, p_last: float, mode: str):
        import torch
        import torch.nn.functional as F

        spec = importlib.util.spec_from_file_location("torch_resnet_sd", args.peer_path)
        peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer)
        torch.manual_seed(0)
        self.torch, self.F = torch, F
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        memory_format = torch.channels_last if args.peer_channels_last else torch.contiguous_format
        self.model = peer.ResNetSD(args.depth, 10, p_last, mode).to(self.device, memory_format=memory_format).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                   weight_decay=1e-4)
        self.x = torch.randn(args.batch_size, 3, 32, 32, device=self.device).to(memory_format=memory_format)
        self.y = torch.randint(0, 10, (args.batch_size,), device=self.device)
        self.bfloat16 = args.dtype == "bfloat16"
        self.device_kind = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu (torch)"
        self.steps, self.compile_s = args.steps, 0.0
        self.run()  # warm-up

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def run(self) -> float:
        self._sync()
        start = time.perf_counter()
        for _ in range(self.steps):
            self.opt.zero_grad(set_to_none=True)
            with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bfloat16):
                loss = self.F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
        self._sync()
        return (time.perf_counter() - start) / self.steps


def arg_parser():
    parser = cli.parser(__doc__)
    parser.add_argument("--model", default="resnet_cifar", choices=tuple(MODEL_DEPTHS),
                        help="the CIFAR ResNet (depth 6n+2) or the bottleneck ResNet-50/101/152")
    parser.add_argument("--depth", type=int, help="default: 110 (resnet_cifar), 50 (resnet_imagenet)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, help="default: 32 (resnet_cifar), 224 (resnet_imagenet)")
    parser.add_argument("--p-last", type=float,
                        help="p_L of the stochastic configuration; default: 0.5, or composer's 0.8 / 0.6 for "
                             "ResNet-50 / 101")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed jitted call")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per configuration")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--scan-blocks", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                        help="nn.scan over identical blocks; 'both' also times the scanned layout (rows "
                             "'jax-scanned'), so compile times and steps compare side by side")
    parser.add_argument("--conv-grads", default="auto", choices=("auto", "explicit", "xla"))
    parser.add_argument("--compiler-options", default="project", choices=("project", "none", "both"),
                        help="compile with the project's XLA options (sd_jax/training/compiler.py), without, or "
                             "both, timed alternately (rows 'jax' and 'jax-no-options')")
    parser.add_argument("--batch-mask", default="on", choices=("on", "off", "both"),
                        help="steps with the per-example mask that training the last partial batch needs "
                             "(partial_last_batch, the default), without, or both (rows 'jax' and 'jax-no-mask')")
    parser.add_argument("--configs", default=",".join(CONFIGURATIONS),
                        help="comma-separated subset of " + ",".join(CONFIGURATIONS))
    parser.add_argument("--peer", choices=("torch",), help="also time the PyTorch eager peer (resnet_cifar)")
    parser.add_argument("--peer-path", default=PEER_PATH, help="path of torch_resnet_sd.py")
    parser.add_argument("--peer-channels-last", action="store_true", help="run the peer in NHWC memory format")
    return parser


def complete_args(args) -> argparse.Namespace:
    """Fill the model-dependent defaults; ConfigError for a depth, p_L or peer the model lacks."""
    defaults = DEFAULTS[args.model]
    args.depth = defaults["depth"] if args.depth is None else args.depth
    args.image_size = defaults["image_size"] if args.image_size is None else args.image_size
    try:
        MODEL_DEPTHS[args.model](args.depth)
    except ValueError as e:
        raise ConfigError(f"--depth {args.depth}: {e}") from None
    if args.p_last is None:
        args.p_last = DEFAULT_P_LAST[args.model].get(args.depth, 0.5)
    if not 0.0 < args.p_last <= 1.0:
        raise ConfigError(f"--p-last {args.p_last} must lie in (0, 1]")
    if args.peer and args.model != "resnet_cifar":
        raise ConfigError("--peer torch times the CIFAR network of shared/peers only; drop --peer or use "
                          "--model resnet_cifar")
    unknown = set(args.configs.split(",")) - set(CONFIGURATIONS)
    if unknown:
        raise ConfigError(f"unknown --configs {sorted(unknown)}; choose from {list(CONFIGURATIONS)}")
    return args


def make_runners(args) -> list:
    """(framework row label, configuration name, step) for every timed variant, compiled and warm."""
    wanted = args.configs.split(",")
    layouts = {"off": (False,), "on": (True,), "both": (False, True)}[args.scan_blocks]
    runners = []
    for name in CONFIGURATIONS:
        if name not in wanted:
            continue
        p_last, mode = configuration(name, args)
        if args.compiler_options in ("project", "both") and args.batch_mask in ("on", "both"):
            for scan in layouts:
                label = "jax-scanned" if scan and len(layouts) > 1 else "jax"
                runners.append((label, name, JaxStep(args, p_last, mode, scan_blocks=scan)))
        if args.batch_mask in ("off", "both"):
            runners.append(("jax-no-mask", name, JaxStep(args, p_last, mode, False, layouts[0])))
        if args.compiler_options in ("none", "both"):
            with compiler.without_options():
                runners.append(("jax-no-options", name, JaxStep(args, p_last, mode, scan_blocks=layouts[0])))
        if args.peer:
            runners.append((args.peer, name, TorchStep(args, p_last, mode)))
    return runners


def ratio(results, numerator, denominator):
    """step_s_median of row `numerator` over row `denominator` (both (framework, configuration))."""
    if numerator in results and denominator in results:
        return results[numerator]["step_s_median"] / results[denominator]["step_s_median"]
    return None


def run(args):
    args = complete_args(args)
    runners = make_runners(args)
    times = [[] for _ in runners]
    for _ in range(args.rounds):
        for (_, _, step), runner_times in zip(runners, times):
            runner_times.append(step.run())
    device = jax.devices()[0]
    results = {}
    for (framework, name, step), runner_times in zip(runners, times):
        median = statistics.median(runner_times)
        p_last, mode = configuration(name, args)
        row = {"framework": framework, "config": name, "model": args.model, "depth": args.depth,
               "image_size": args.image_size, "p_last": p_last, "mode": mode, "batch_size": args.batch_size,
               "dtype": args.dtype, "compile_s": round(step.compile_s, 3), "step_s_median": median,
               "images_per_s": args.batch_size / median,
               "device_kind": step.device_kind if framework == args.peer else device.device_kind}
        results[(framework, name)] = row
        print(json.dumps(row), flush=True)
    summary = {"summary": True, "model": args.model, "depth": args.depth, "image_size": args.image_size,
               "batch_size": args.batch_size, "dtype": args.dtype, "p_last": args.p_last,
               **provenance.provenance(), "cpu_count": os.cpu_count(),
               "date": datetime.date.today().isoformat(), "scan_blocks": args.scan_blocks,
               "conv_grads": args.conv_grads, "compiler_options_mode": args.compiler_options,
               "batch_mask": args.batch_mask,
               "peer_channels_last": args.peer_channels_last, "steps": args.steps, "rounds": args.rounds}
    measured = {
        "sd_over_constant": (("jax", "stochastic"), ("jax", "constant")),
        f"{args.peer}_sd_over_constant": ((args.peer, "stochastic"), (args.peer, "constant")),
        "floor_over_constant": (("jax", "floor"), ("jax", "constant")),
        "scanned_sd_over_constant": (("jax-scanned", "stochastic"), ("jax-scanned", "constant")),
    }
    for name in CONFIGURATIONS:
        measured[f"options_speedup_{name}"] = (("jax-no-options", name), ("jax", name))
        measured[f"mask_cost_{name}"] = (("jax", name), ("jax-no-mask", name))
        measured[f"scanned_over_unrolled_{name}"] = (("jax-scanned", name), ("jax", name))
        measured[f"speedup_vs_peer_{name}"] = ((args.peer, name), ("jax", name))
    for key, (numerator, denominator) in measured.items():
        value = ratio(results, numerator, denominator)
        if value is not None:
            summary[key] = value
    for name in CONFIGURATIONS:
        if ("jax", name) in results and ("jax-scanned", name) in results:
            summary[f"compile_unrolled_over_scanned_{name}"] = (results[("jax", name)]["compile_s"]
                                                                / results[("jax-scanned", name)]["compile_s"])
    if "speedup_vs_peer_stochastic" in summary:
        summary["speedup_vs_peer"] = summary["speedup_vs_peer_stochastic"]
    num_classes = DEFAULTS[args.model]["num_classes"]
    for key, name in (("expected_ratio", "stochastic"), ("expected_floor_ratio", "floor")):
        model = make_model(bench_config(args, *configuration(name, args)), num_classes)
        summary[key] = expected_step_ratio(model, args.image_size)
    print(json.dumps(summary), flush=True)
    return results, summary


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
