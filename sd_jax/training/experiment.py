"""Everything built from a config before training: the dataset, its copies on the devices, the
plan, the random keys and the initial state. The whole CIFAR/SVHN dataset sits on the device as
uint8; ImageNet stays on the host (sd_jax.data.input_pipeline)."""
import dataclasses

import ml_collections
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from sd_jax.data import cifar_svhn, imagenet

from sd_jax.training import parallel
from sd_jax.training.startup import untimed
from sd_jax.config import HOST_FED_DATASETS, ConfigError, resolve_convention
from sd_jax.training.plan import TrainingPlan, TrainState, initial_state, make_plan, run_keys


def device_eval_split(split: cifar_svhn.Split, batch_size: int, mesh: Mesh) -> dict:
    """An evaluation split on the devices, padded to whole batches (padding labelled -1), each batch
    split across the devices."""
    n = len(split)
    batches = -(-n // batch_size)
    pad = batches * batch_size - n
    images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
    labels = np.concatenate([split.labels, -np.ones(pad, np.int32)])
    spec = PartitionSpec(None, parallel.AXIS)
    return {"images": parallel.put(images.reshape((batches, batch_size) + images.shape[1:]), mesh, spec),
            "labels": parallel.put(labels.reshape(batches, batch_size), mesh, spec)}


EVAL_SPLITS = ("val", "test")


def device_eval_data(dataset: cifar_svhn.Dataset, batch_size: int, mesh: Mesh, mean, std) -> dict:
    """What evaluation needs on the devices: the validation and test splits (with their sizes) and
    the input normalisation `mean`, `std` (from the training split: `Dataset.normalization`)."""
    return {"splits": {name: device_eval_split(getattr(dataset, name), batch_size, mesh) for name in EVAL_SPLITS},
            "sizes": {name: len(getattr(dataset, name)) for name in EVAL_SPLITS},
            "mean": parallel.replicate(mean, mesh), "std": parallel.replicate(std, mesh)}


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before training: the dataset and its device copies, the
    plan, the random keys and the initial state."""

    config: ml_collections.ConfigDict
    dataset: cifar_svhn.Dataset
    plan: TrainingPlan
    keys: dict
    state: TrainState
    train_data: dict
    eval_data: dict


def make_experiment(config: ml_collections.ConfigDict, phase=untimed) -> Experiment:
    """Load the data onto the devices and build the plan and the initial state (the convention keys
    of `config` left at None are set from its convention). Every check that needs the data (batch
    size, number of classes) raises ConfigError here, before anything is written. `phase(name)`:
    a context timing each step (`startup.StartupClock.phase`)."""
    resolve_convention(config)
    host_fed = config.dataset in HOST_FED_DATASETS
    with phase("data"):
        dataset = imagenet.load(config) if host_fed else cifar_svhn.load_dataset(config.dataset, config.data_dir,
                                                                            config.data_source)
    if config.num_classes is not None and config.num_classes != dataset.num_classes:
        raise ConfigError(f"num_classes={config.num_classes} but {dataset.name} has {dataset.num_classes} "
                          "classes; leave num_classes unset to take it from the dataset")
    mesh = parallel.make_mesh()
    plan = make_plan(config, len(dataset.train), dataset.num_classes, dataset.translate, dataset.flip, mesh)
    keys = run_keys(config.seed)
    with phase("initialisation"):
        state = parallel.replicate(initial_state(keys["init"], plan, dataset.image_shape), mesh)
    keys = parallel.replicate(keys, mesh)
    mean, std = dataset.normalization(config.normalization)
    if host_fed:  # the images stay on the host: sd_jax.data.input_pipeline feeds them (HostFeed)
        return Experiment(config, dataset, plan, keys, state, parallel.replicate({"mean": mean, "std": std}, mesh),
                          None)
    with phase("data on the devices"):
        train_data = parallel.replicate({"images": dataset.train.images, "labels": dataset.train.labels,
                                         "mean": mean, "std": std}, mesh)
        eval_data = device_eval_data(dataset, config.eval_batch_size, mesh, mean, std)
    return Experiment(config, dataset, plan, keys, state, train_data, eval_data)
