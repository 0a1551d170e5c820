"""Benchmark the real jitted training step: constant depth vs stochastic depth (and a PyTorch peer).

    python -m sd_jax.bench --depth 110 --batch-size 128 [--steps 3] [--rounds 5] [--dtype float32]
        [--peer torch [--peer-channels-last]] [--scan-blocks] [--conv-grads auto|explicit|xla]
        [--compiler-options project|none|both] [--batch-mask on|off|both]

Each configuration is compiled, warmed up, then timed in rounds; every round times each
configuration once, alternately, so drifts of a noisy machine hit them all alike. Prints one JSON
object per configuration and a final summary object.
"""
import datetime
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import cli, compiler, parallel, provenance, training
from sd_jax.config import ConfigError, default_config, resolve_convention
from sd_jax.models import blocks_per_stage
from sd_jax.survival import survival_probabilities

# (name, p_last, survival mode): constant depth, the paper's setting, and the all-dropped floor.
CONFIGURATIONS = (("constant", 1.0, "linear"), ("stochastic", 0.5, "linear"), ("floor", 0.0, "uniform"))
PEER_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers", "torch_resnet_sd.py")


def block_costs(depth: int, image_size: int = 32):
    """Multiply-adds of each residual branch, and of everything outside the blocks (stem, head)."""
    n = blocks_per_stage(depth)
    costs = []
    channels_in, size = 16, image_size
    for stage, channels in enumerate((16, 32, 64)):
        for i in range(n):
            out_size = size // 2 if (stage > 0 and i == 0) else size
            costs.append(9 * out_size * out_size * channels * (channels_in + channels))
            channels_in, size = channels, out_size
    stem = 9 * image_size * image_size * 3 * 16 + 64 * 10
    return np.array(costs, np.float64), float(stem)


def expected_step_ratio(depth: int, p_last: float, mode: str) -> float:
    """Expected compute of a stochastic-depth step relative to constant depth (blocks weighted by cost)."""
    costs, fixed = block_costs(depth)
    p = survival_probabilities(len(costs), p_last, mode)
    return float((fixed + (p * costs).sum()) / (fixed + costs.sum()))


def random_train_data(num_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8),
            "labels": rng.integers(0, 10, num_images, dtype=np.int32),
            "mean": np.full((3,), 0.5, np.float32), "std": np.full((3,), 0.25, np.float32)}


class JaxStep:
    """The training loop's own jitted multi-step function, on random CIFAR-shaped data."""

    def __init__(self, args, p_last: float, mode: str, batch_mask: bool = True):
        config = default_config()
        config.update(depth=args.depth, batch_size=args.batch_size, p_last=p_last, survival_mode=mode,
                      dtype=args.dtype, scan_blocks=args.scan_blocks, conv_grads=args.conv_grads,
                      partial_last_batch=batch_mask, num_epochs=1)
        resolve_convention(config)
        self.steps = args.steps
        mesh = parallel.make_mesh()
        num_train = args.batch_size * args.steps  # one epoch of `steps` steps
        self.train_data = parallel.replicate(random_train_data(num_train), mesh)
        plan = training.make_plan(config, num_train, num_classes=10, translate=4, flip=True, mesh=mesh)
        self.keys = parallel.replicate(training.run_keys(0), mesh)
        self.state = parallel.replicate(training.make_train_state(self.keys["init"], plan, (32, 32, 3)), mesh)
        self.perm = jnp.arange(args.batch_size * args.steps)
        start = time.perf_counter()
        self.fn = training.make_train_steps(plan, config).lower(
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
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed jitted call")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per configuration")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--scan-blocks", action="store_true")
    parser.add_argument("--conv-grads", default="auto", choices=("auto", "explicit", "xla"))
    parser.add_argument("--compiler-options", default="project", choices=("project", "none", "both"),
                        help="compile with the project's XLA options (sd_jax/compiler.py), without, or "
                             "both, timed alternately (rows 'jax' and 'jax-no-options')")
    parser.add_argument("--batch-mask", default="on", choices=("on", "off", "both"),
                        help="steps with the per-example mask that training the last partial batch needs "
                             "(partial_last_batch, the default), without, or both (rows 'jax' and 'jax-no-mask')")
    parser.add_argument("--configs", default="constant,stochastic,floor",
                        help="comma-separated subset of " + ",".join(c[0] for c in CONFIGURATIONS))
    parser.add_argument("--peer", choices=("torch",), help="also time the PyTorch eager peer")
    parser.add_argument("--peer-path", default=PEER_PATH, help="path of torch_resnet_sd.py")
    parser.add_argument("--peer-channels-last", action="store_true", help="run the peer in NHWC memory format")
    return parser


def run(args):
    try:
        blocks_per_stage(args.depth)
    except ValueError as e:
        raise ConfigError(f"--depth {args.depth}: {e}") from None
    unknown = set(args.configs.split(",")) - {c[0] for c in CONFIGURATIONS}
    if unknown:
        raise ConfigError(f"unknown --configs {sorted(unknown)}; choose from {[c[0] for c in CONFIGURATIONS]}")
    wanted = args.configs.split(",")
    runners = []
    for name, p_last, mode in CONFIGURATIONS:
        if name in wanted:
            if args.compiler_options in ("project", "both") and args.batch_mask in ("on", "both"):
                runners.append(("jax", name, p_last, mode, JaxStep(args, p_last, mode)))
            if args.batch_mask in ("off", "both"):
                runners.append(("jax-no-mask", name, p_last, mode, JaxStep(args, p_last, mode, batch_mask=False)))
            if args.compiler_options in ("none", "both"):
                with compiler.without_options():
                    runners.append(("jax-no-options", name, p_last, mode, JaxStep(args, p_last, mode)))
            if args.peer:
                runners.append((args.peer, name, p_last, mode, TorchStep(args, p_last, mode)))
    times = [[] for _ in runners]
    for _ in range(args.rounds):
        for runner, runner_times in zip(runners, times):
            runner_times.append(runner[4].run())
    device = jax.devices()[0]
    results = {}
    for (framework, name, p_last, mode, step), runner_times in zip(runners, times):
        median = statistics.median(runner_times)
        row = {"framework": framework, "config": name, "depth": args.depth, "p_last": p_last, "mode": mode,
               "batch_size": args.batch_size, "dtype": args.dtype, "compile_s": round(step.compile_s, 3),
               "step_s_median": median, "images_per_s": args.batch_size / median,
               "device_kind": step.device_kind if framework == args.peer else device.device_kind}
        results[(framework, name)] = row
        print(json.dumps(row), flush=True)
    summary = {"summary": True, "depth": args.depth, "batch_size": args.batch_size, "dtype": args.dtype,
               **provenance.provenance(), "cpu_count": os.cpu_count(),
               "date": datetime.date.today().isoformat(), "scan_blocks": args.scan_blocks,
               "conv_grads": args.conv_grads, "compiler_options_mode": args.compiler_options,
               "batch_mask": args.batch_mask,
               "peer_channels_last": args.peer_channels_last, "steps": args.steps, "rounds": args.rounds}
    for framework in ("jax", args.peer):
        const, sd = results.get((framework, "constant")), results.get((framework, "stochastic"))
        if const and sd:
            key = "sd_over_constant" if framework == "jax" else f"{framework}_sd_over_constant"
            summary[key] = sd["step_s_median"] / const["step_s_median"]
    for name in wanted:
        if ("jax", name) in results and ("jax-no-options", name) in results:
            summary[f"options_speedup_{name}"] = (results[("jax-no-options", name)]["step_s_median"]
                                                  / results[("jax", name)]["step_s_median"])
        if ("jax", name) in results and ("jax-no-mask", name) in results:
            summary[f"mask_cost_{name}"] = (results[("jax", name)]["step_s_median"]
                                            / results[("jax-no-mask", name)]["step_s_median"])
    if ("jax", "stochastic") in results:
        summary["expected_ratio"] = expected_step_ratio(args.depth, 0.5, "linear")
    if ("jax", "floor") in results and ("jax", "constant") in results:
        summary["floor_over_constant"] = results[("jax", "floor")]["step_s_median"] / results[("jax", "constant")]["step_s_median"]
    if args.peer:
        for name in wanted:
            if ("jax", name) in results and (args.peer, name) in results:
                summary[f"speedup_vs_peer_{name}"] = (results[(args.peer, name)]["step_s_median"]
                                                      / results[("jax", name)]["step_s_median"])
        if "speedup_vs_peer_stochastic" in summary:
            summary["speedup_vs_peer"] = summary["speedup_vs_peer_stochastic"]
    print(json.dumps(summary), flush=True)
    return results, summary


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
