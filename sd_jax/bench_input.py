"""Benchmark ImageNet's input: the host loader alone (images/s against tf.data threads), the
device's share of the augmentation alone (with and without the paper's colour jitter and PCA
lighting), and end to end (the host-fed training call) against the same train step on
device-resident data.

    python -m sd_jax.bench_input [--images 512] [--image-size 224] [--batch-size 32] [--threads 1,2]
        [--end-to-end] [--colour off|on|both] [--depth 50] [--p-last 0.8] [--steps-per-call 4] [--calls 3]
        [--dir DIR]

The images are synthetic JPEGs of ImageNet-like sizes written to an ImageFolder on local disk
(`--dir`, default a temporary folder), so the loader reads and decodes files as it would ImageNet's.
Prints one JSON object per measurement and a final summary object.
"""
import datetime
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from sd_jax import bench, cli

from sd_jax.data import augment, imagenet, input_pipeline

from sd_jax.training import provenance
from sd_jax.config import ConfigError, load_config, resolve_convention
from sd_jax.training.experiment import make_experiment
from sd_jax.training.feeds import HostFeed

FOLDER_CLASSES = 10  # the synthetic ImageFolder spreads its images over the first ten wnids


def write_image_folder(root: str, split: str, num_images: int) -> imagenet.ImageSplit:
    """`num_images` synthetic JPEGs as root/split/<wnid>/<i>.JPEG (kept when already there)."""
    seed = {"train": 0, "val": 1}[split]
    for i in range(num_images):
        folder = os.path.join(root, split, imagenet.wnids()[i % FOLDER_CLASSES])
        path = os.path.join(folder, f"{i:07d}.JPEG")
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            with open(path, "wb") as f:
                f.write(input_pipeline.synthetic_jpeg(seed, i).numpy())
    return imagenet.image_folder(root, split)


def loader_rate(split: imagenet.ImageSplit, batch_size: int, image_size: int, threads: int, rounds: int) -> dict:
    """Training batches decoded per second with `threads` tf.data threads: median over `rounds`
    epochs, each timed from its first batch on (pipeline start-up excluded)."""
    rates = []
    for epoch in range(1, rounds + 1):
        indices, dataset = input_pipeline.train_batches(split, 0, epoch, batch_size, image_size, threads=threads)
        batches = input_pipeline.numpy_batches(split, indices, dataset)
        next(batches)
        start = time.perf_counter()
        count = sum(1 for _ in batches)
        rates.append(count * batch_size / (time.perf_counter() - start))
    return {"measure": "loader", "threads": threads, "images_per_s": statistics.median(rates),
            "batches": len(indices) - 1, "rounds": rounds}


COLOUR = {"off": {"color_jitter": 0.0, "lighting_std": 0.0},  # composer's recipe
          "on": {"color_jitter": 0.4, "lighting_std": 0.1}}  # the paper's (fb.resnet.torch)


def host_fed_feed(args, root: str, threads: int, colour: str):
    """A compiled host-fed feed of composer's ResNet config at the benchmark's sizes, colour
    augmentation as `colour` ("off" or "on")."""
    config = load_config("imagenet_resnet50_composer_sd")
    config.update(data_source="files", data_dir=root, depth=args.depth, p_last=args.p_last, image_size=args.image_size,
                  batch_size=args.batch_size, steps_per_call=args.steps_per_call, dtype=args.dtype,
                  data_threads=threads, **COLOUR[colour])
    experiment = make_experiment(resolve_convention(config))
    feed = HostFeed(experiment)
    feed.compile(experiment.state)
    return feed, experiment


def colour_settings(args) -> list:
    """The colour settings `--colour` asks to time: "off", "on" or both."""
    return ["off", "on"] if args.colour == "both" else [args.colour]


AUGMENT_CALLS = 20


def device_augment_rate(args, colour: str) -> dict:
    """The device's share of ImageNet's augmentation alone, jitted, on one batch of uint8 crops at
    the benchmark's size: to [0, 1], the colour jitter and PCA lighting when `colour` is "on", and
    the normalisation; images/s, median over AUGMENT_CALLS calls after one warm-up."""
    settings = COLOUR[colour]

    @jax.jit
    def augment_batch(images_u8, key):
        images = augment.to_unit(images_u8)
        if colour == "on":
            draws = augment.colour_draws(key, args.batch_size, settings["color_jitter"], settings["lighting_std"])
            images = augment.recolour(images, draws, jitter=True)
        return augment.standardize(images, imagenet.MEAN, imagenet.STD, jnp.dtype(args.dtype))

    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = jax.random.randint(jax.random.key(0), shape, 0, 256).astype(jnp.uint8)
    times = []
    for call in range(AUGMENT_CALLS + 1):
        start = time.perf_counter()
        jax.block_until_ready(augment_batch(images, jax.random.key(call)))
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return {"measure": "device_augment", "colour": colour, "batch_s_median": step, "images_per_s": args.batch_size / step}


def end_to_end(args, root: str, threads: int) -> list:
    """The host-fed training call (decode on the host, step on the device), with and without the
    colour augmentation as `--colour` says, and the same step on device-resident random images,
    timed alternately: images/s of each."""
    colours = colour_settings(args)
    feeds = {colour: host_fed_feed(args, root, threads, colour) for colour in colours}
    step_args = bench.complete_args(bench.arg_parser().parse_args(
        ["--model", "resnet_imagenet", "--depth", str(args.depth), "--image-size", str(args.image_size),
         "--batch-size", str(args.batch_size), "--steps", str(args.steps_per_call), "--dtype", args.dtype]))
    device_step = bench.JaxStep(step_args, args.p_last, "linear")
    states = {colour: experiment.state for colour, (_, experiment) in feeds.items()}
    steps_per_epoch = next(iter(feeds.values()))[1].plan.steps_per_epoch
    host_times, device_times, step = {colour: [] for colour in colours}, [], 0
    for _ in range(args.calls + 1):  # the first call of each warms up
        count = min(args.steps_per_call, steps_per_epoch - step % steps_per_epoch)
        for colour, (feed, _) in feeds.items():
            start = time.perf_counter()
            states[colour], sums = feed.train(states[colour], step // steps_per_epoch + 1, step % steps_per_epoch, count)
            jax.block_until_ready(sums)
            host_times[colour].append((time.perf_counter() - start) / count)
        device_times.append(device_step.run())
        step += count
    rows = []
    for colour, times in host_times.items():
        host = statistics.median(times[1:])
        rows.append({"measure": "end_to_end", "threads": threads, "colour": colour, "step_s_median": host,
                     "images_per_s": args.batch_size / host})
    device = statistics.median(device_times[1:])
    return rows + [{"measure": "device_resident_step", "step_s_median": device, "images_per_s": args.batch_size / device}]


def arg_parser():
    parser = cli.parser(__doc__)
    parser.add_argument("--images", type=int, default=512, help="synthetic JPEGs written to the ImageFolder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", default="1,2", help="comma-separated tf.data thread counts to time")
    parser.add_argument("--rounds", type=int, default=3, help="epochs timed per thread count")
    parser.add_argument("--end-to-end", action="store_true", help="also time the host-fed training call")
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101, 152))
    parser.add_argument("--p-last", type=float, default=0.8)
    parser.add_argument("--steps-per-call", type=int, default=4)
    parser.add_argument("--calls", type=int, default=3, help="timed training calls (after one warm-up)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--colour", default="off", choices=("off", "on", "both"),
                        help="without the paper's colour jitter and PCA lighting, with them, or both: the "
                             "device's augmentation alone, and end to end with --end-to-end")
    parser.add_argument("--dir", default="", help="where to write the ImageFolder (default: a temporary folder)")
    return parser


def run(args):
    threads = [int(t) for t in args.threads.split(",")]
    if min(threads) < 1 or args.images < 2 * args.batch_size:
        raise ConfigError(f"--threads must be counts >= 1 and --images ({args.images}) at least two batches "
                          f"({2 * args.batch_size})")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or scratch
        split = write_image_folder(root, "train", args.images)
        write_image_folder(root, "val", args.batch_size)  # the training run's experiment lists it
        rows = [loader_rate(split, args.batch_size, args.image_size, t, args.rounds) for t in threads]
        rows += [device_augment_rate(args, colour) for colour in colour_settings(args)]
        if args.end_to_end:
            rows += end_to_end(args, root, max(threads))
    for row in rows:
        print(json.dumps(row), flush=True)
    summary = {"summary": True, "images": args.images, "image_size": args.image_size, "batch_size": args.batch_size,
               **provenance.provenance(), "cpu_count": os.cpu_count(), "date": datetime.date.today().isoformat()}
    rates = {row["threads"]: row["images_per_s"] for row in rows if row["measure"] == "loader"}
    summary["loader_scaling"] = rates[max(rates)] / rates[min(rates)]
    if args.end_to_end:
        host_fed = {row["colour"]: row["images_per_s"] for row in rows if row["measure"] == "end_to_end"}
        summary["end_to_end_over_device_step"] = host_fed.get("off", host_fed.get("on")) / rows[-1]["images_per_s"]
        if len(host_fed) == 2:
            summary["colour_on_over_off"] = host_fed["on"] / host_fed["off"]
    augmented = {row["colour"]: row["batch_s_median"] for row in rows if row["measure"] == "device_augment"}
    if len(augmented) == 2:
        summary["colour_s_per_batch"] = augmented["on"] - augmented["off"]
        if args.end_to_end:
            summary["colour_share_of_step"] = summary["colour_s_per_batch"] / rows[-1]["step_s_median"]
    print(json.dumps(summary), flush=True)
    return rows, summary


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
