"""The host side of ImageNet: read, decode, crop and batch encoded images with tf.data.

Training images get a random-resized crop (area 0.08-1, aspect 3/4-4/3, the centre crop when ten
draws find none), decoded only inside the crop window; evaluation images the centre crop of
`crop_fraction` of the short side (0.875: 224 px out of 256), resized. Both come out uint8 at
`image_size`: flips and normalisation happen on the device, as for CIFAR.

Everything random is stateless: the epoch's order is a permutation drawn from (seed, epoch), an
image's crop from (seed, epoch, image index). A run restarted at any step therefore sees exactly
the images and crops the uninterrupted run saw. Each process reads its own slice of every global
batch: disjoint, and together the whole batch.
"""
import numpy as np
import tensorflow as tf

from sd_jax.data.files import DataError
from sd_jax.data.imagenet import ImageSplit

tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators JAX uses

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875
SYNTHETIC_SIDES = (192, 512)  # height and width of synthetic JPEGs, drawn in [192, 512) px


def example_key(seed: int, epoch, index):
    """The stateless key of one image's random crop in one epoch."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def synthetic_jpeg(seed: int, index):
    """A JPEG of ImageNet-like size and smooth random content, a function of (seed, index) only."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), tf.cast(index, tf.int64))
    size = tf.random.stateless_uniform([2], key, *SYNTHETIC_SIDES, dtype=tf.int32)
    coarse = tf.random.stateless_uniform([6, 6, 3], key + 1, 0, 255)
    return tf.io.encode_jpeg(to_uint8(tf.image.resize(coarse, size, method="bilinear")), quality=90)


def read_encoded(split: ImageSplit, index):
    """The encoded bytes of image `index` of `split`: its file, its tfds record, or the synthetic JPEG."""
    if split.paths is not None:
        return tf.io.read_file(tf.gather(tf.constant(split.paths), index))
    if split.records is None:
        return synthetic_jpeg(split.seed, index)
    record = tf.gather(tf.constant(split.record_index()), index)
    encoded = tf.numpy_function(lambda i: split.records[int(i)]["image"], [record], tf.string, stateful=False)
    encoded.set_shape([])
    return encoded


def image_shape(encoded):
    """(height, width) without decoding a JPEG; other formats (a PNG named .JPEG) are decoded."""
    return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                   lambda: tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2])


def decode_window(encoded, window):
    """RGB uint8 pixels of `window` (y, x, height, width): a JPEG decodes only the window (CMYK and
    grayscale JPEGs to RGB), anything else decodes whole, then is cropped."""
    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

    return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.decode_and_crop_jpeg(encoded, window, channels=3), other)


def centre_window(shape, crop_fraction: float = EVAL_CROP_FRACTION):
    """The centred square of `crop_fraction` of the short side, as (y, x, height, width)."""
    side = tf.cast(crop_fraction * tf.cast(tf.reduce_min(shape), tf.float32), tf.int32)
    return tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])


def random_window(shape, key):
    """A random-resized-crop window (y, x, height, width): area AREA_RANGE of the image, aspect
    ASPECT_RANGE, or the centre window when CROP_ATTEMPTS draws find none (as torchvision's
    RandomResizedCrop and the flax ImageNet example fall back)."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], 0), tf.zeros([0, 0, 4], tf.float32), seed=key, min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RANGE, area_range=AREA_RANGE, max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.cond(tf.reduce_all(size[:2] == shape), lambda: centre_window(shape), lambda: window)


def to_uint8(pixels):
    """Float pixel values rounded and clipped to uint8."""
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)


def resize(image, image_size: int):
    """Bilinear with antialiasing (as torchvision's PIL resize), rounded back to uint8."""
    return to_uint8(tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True))


def train_image(encoded, key, image_size: int):
    return resize(decode_window(encoded, random_window(image_shape(encoded), key)), image_size)


def eval_image(encoded, image_size: int):
    return resize(decode_window(encoded, centre_window(image_shape(encoded))), image_size)


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of (1-based) `epoch`: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def process_slices(order: np.ndarray, batch_size: int, process_index: int = 0, process_count: int = 1,
                   start_step: int = 0) -> np.ndarray:
    """(steps - start_step, batch_size / process_count) indices: this process's slice of every global
    batch of `order` from `start_step` on (the last, short batch dropped)."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must divide evenly over {process_count} processes")
    steps, local = len(order) // batch_size, batch_size // process_count
    batches = order[:steps * batch_size].reshape(steps, batch_size)
    return batches[start_step:, process_index * local:(process_index + 1) * local]


def train_batches(split: ImageSplit, seed: int, epoch: int, batch_size: int, image_size: int,
                  process_index: int = 0, process_count: int = 1, start_step: int = 0, threads: int = 0):
    """The epoch's batches for this process from `start_step`: (indices, dataset of (uint8 images,
    int32 labels)); `threads` > 0 caps tf.data's thread pool (0: tf.data decides)."""
    indices = process_slices(epoch_order(len(split), seed, epoch), batch_size, process_index, process_count,
                             start_step)
    labels = tf.constant(split.labels)

    def load(index):
        return train_image(read_encoded(split, index), example_key(seed, epoch, index), image_size), labels[index]

    return indices, batched(indices, load, threads)


def eval_batches(split: ImageSplit, batch_size: int, image_size: int, process_index: int = 0,
                 process_count: int = 1, threads: int = 0):
    """Every image of `split` once, in order, padded to whole batches: padding repeats image 0 with
    label -1 (left out of the error counts); (indices, dataset) as `train_batches`."""
    steps = -(-len(split) // batch_size)
    order = np.concatenate([np.arange(len(split)), -np.ones(steps * batch_size - len(split), np.int64)])
    indices = process_slices(order, batch_size, process_index, process_count)
    labels = tf.constant(split.labels)

    def load(index):
        real = index >= 0
        image = eval_image(read_encoded(split, tf.maximum(index, 0)), image_size)
        return image, tf.where(real, labels[tf.maximum(index, 0)], -1)

    return indices, batched(indices, load, threads)


def batched(indices: np.ndarray, load, threads: int) -> tf.data.Dataset:
    """`load` over `indices` (steps, local) in order, in parallel, batched by row, prefetched."""
    dataset = tf.data.Dataset.from_tensor_slices(indices.reshape(-1))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(indices.shape[1], drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    if threads:
        options.threading.private_threadpool_size = threads
    return dataset.with_options(options)


def numpy_batches(split: ImageSplit, indices: np.ndarray, dataset: tf.data.Dataset):
    """Iterate `dataset` as numpy (images, labels); a file that cannot be decoded raises DataError
    naming it (tf.data's own error does not say which file)."""
    iterator = dataset.as_numpy_iterator()
    for row in indices:
        try:
            yield next(iterator)
        except tf.errors.InvalidArgumentError as e:
            raise DataError(unreadable_files(split, row, e)) from None


def unreadable_files(split: ImageSplit, row: np.ndarray, error) -> str:
    """The message for a batch that failed to decode: the files of `row` that do not decode."""
    bad = []
    for index in row[row >= 0]:
        try:
            encoded = read_encoded(split, int(index))
            decode_window(encoded, centre_window(image_shape(encoded), 1.0))
        except tf.errors.OpError:
            bad.append(str(split.paths[index]) if split.paths is not None else f"synthetic image {index}")
    first_line = str(error).strip().splitlines()[0][:200]
    return (f"cannot decode {', '.join(bad) or 'an image of this batch'} ({first_line}); replace or remove "
            "the file (the official ImageNet files all decode)")
