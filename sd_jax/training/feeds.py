"""Where a run's batches come from: the device-resident dataset (CIFAR, SVHN: each jitted call
gathers its batches on the device from the epoch's permutation) or the host (ImageNet: tf.data
batches stacked per call). Both train through the same jitted loop and evaluate with the same counts."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sd_jax.training import parallel
from sd_jax.config import HOST_FED_DATASETS
from sd_jax.training.experiment import Experiment
from sd_jax.training.plan import TrainingPlan, TrainState
from sd_jax.training.steps import (HOST_BATCH_SPEC, make_batch_errors, make_count_errors, make_host_train_steps,
                                   make_train_steps)


def epoch_permutation(keys, epoch: int, plan: TrainingPlan, batch_size: int):
    """The order of the training images in (1-based) `epoch`, padded with index 0 to whole batches."""
    perm = jax.random.permutation(jax.random.fold_in(keys["shuffle"], epoch), plan.num_train)
    return jnp.pad(perm, (0, max(0, plan.steps_per_epoch * batch_size - plan.num_train)))


def error_rates(count_errors, variables: dict, eval_data: dict) -> dict:
    """{"val_error", "test_error"}: percent misclassified by the model `variables` (the one
    evaluation loop: training, sd_jax.evaluate and sd_jax.interop)."""
    return {f"{name}_error": 100.0 * float(count_errors(variables, split, eval_data["mean"], eval_data["std"]))
            / eval_data["sizes"][name] for name, split in eval_data["splits"].items()}


class DeviceFeed:
    """Training and evaluation on a dataset resident on the devices (CIFAR, SVHN): each call
    gathers its batches there from the epoch's permutation."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.train_steps = make_train_steps(experiment.plan, experiment.config)
        self.count_errors = make_count_errors(experiment.config, experiment.plan.model, experiment.plan.mesh)
        self.permutations = {}

    def permutation(self, epoch: int):
        if epoch not in self.permutations:
            self.permutations = {epoch: epoch_permutation(self.experiment.keys, epoch, self.experiment.plan,
                                                          self.experiment.config.batch_size)}
        return self.permutations[epoch]

    def compile(self, state: TrainState) -> None:
        self.train_steps = self.train_steps.lower(state, self.experiment.train_data, self.experiment.keys,
                                                  self.permutation(0), 0, 1).compile()

    def train(self, state: TrainState, epoch: int, first: int, count: int):
        """`count` steps from step `first` (0-based) of `epoch` (1-based): (state, summed metrics)."""
        return self.train_steps(state, self.experiment.train_data, self.experiment.keys, self.permutation(epoch),
                                first, count)

    def error_rates(self, variables: dict) -> dict:
        return error_rates(self.count_errors, variables, self.experiment.eval_data)


class HostFeed:
    """Training and evaluation on batches decoded on the host (ImageNet, sd_jax.data.input_pipeline):
    `steps_per_call` batches stacked per jitted call. The pipeline restarts wherever the loop asks
    (a resumed run), and its order and crops depend on (seed, epoch, index) only, so a resumed run
    trains on exactly the uninterrupted run's batches."""

    def __init__(self, experiment: Experiment):
        # TensorFlow loads only for host-fed data: it costs seconds at start, and PyTorch's triton
        # imported after it in the same process (the parity tests) crashes.
        from sd_jax.data import input_pipeline

        self.pipeline = input_pipeline
        self.experiment, self.config, self.plan = experiment, experiment.config, experiment.plan
        self.train_steps = make_host_train_steps(self.plan, self.config)
        self.batch_errors = make_batch_errors(self.config, self.plan.model, self.plan.mesh)
        self.batches, self.position = None, None  # the open epoch's batches, and the (epoch, step) they yield next

    def host_arrays(self, images, labels) -> dict:
        """Global device arrays from this process's stacked batches (K, local, ...), split along the batch."""
        chunk, spec = (self.config.steps_per_call, self.config.batch_size), HOST_BATCH_SPEC["images"]
        return {"images": parallel.put_process_local(images, self.plan.mesh, spec,
                                                     chunk + self.experiment.dataset.image_shape),
                "labels": parallel.put_process_local(labels, self.plan.mesh, spec, chunk),
                **{k: self.experiment.train_data[k] for k in ("mean", "std")}}

    def local_chunk(self):
        local = self.config.batch_size // jax.process_count()
        return (np.zeros((self.config.steps_per_call, local) + self.experiment.dataset.image_shape, np.uint8),
                np.zeros((self.config.steps_per_call, local), np.int32))

    def compile(self, state: TrainState) -> None:
        self.train_steps = self.train_steps.lower(state, self.host_arrays(*self.local_chunk()), self.experiment.keys,
                                                  1).compile()

    def train(self, state: TrainState, epoch: int, first: int, count: int):
        if self.position != (epoch, first):
            split = self.experiment.dataset.train
            indices, dataset = self.pipeline.train_batches(
                split, self.config.seed, epoch, self.config.batch_size, self.experiment.dataset.image_size,
                jax.process_index(), jax.process_count(), start_step=first, threads=self.experiment.dataset.threads)
            self.batches = self.pipeline.numpy_batches(split, indices, dataset)
        images, labels = self.local_chunk()
        for i in range(count):
            images[i], labels[i] = next(self.batches)
        self.position = (epoch, first + count)
        return self.train_steps(state, self.host_arrays(images, labels), self.experiment.keys, count)

    def error_rates(self, variables: dict) -> dict:
        """Top-1 and top-5 error (percent) on the minival ("val") and the official validation images ("test")."""
        dataset, batch, rates = self.experiment.dataset, self.config.eval_batch_size, {}
        put = lambda x: parallel.put_process_local(x, self.plan.mesh, PartitionSpec(parallel.AXIS),  # noqa: E731
                                                   (batch,) + x.shape[1:])
        for name in ("val", "test"):
            split = getattr(dataset, name)
            indices, batches = self.pipeline.eval_batches(split, batch, dataset.image_size, jax.process_index(),
                                                           jax.process_count(), dataset.threads)
            wrong = np.zeros(2)
            for images, labels in self.pipeline.numpy_batches(split, indices, batches):
                wrong += np.asarray(self.batch_errors(variables, put(images), put(labels),
                                                      self.experiment.train_data["mean"],
                                                      self.experiment.train_data["std"]))
            rates[f"{name}_error"], rates[f"{name}_top5_error"] = (100.0 * wrong / len(split)).tolist()
        return rates


def make_feed(experiment: Experiment):
    """The experiment's feed: from the host for ImageNet, else from the device-resident dataset."""
    return HostFeed(experiment) if experiment.config.dataset in HOST_FED_DATASETS else DeviceFeed(experiment)
