"""ImageNet's host side: the ImageFolder and synthetic sources, the crops, the stateless order and
the per-process shards (sd_jax.data.imagenet, sd_jax.data.input_pipeline)."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from sd_jax.data import imagenet
from sd_jax.data.files import DataError

@pytest.fixture(scope="module")
def ip():
    """sd_jax.data.input_pipeline, imported only when these tests run: TensorFlow loaded while pytest
    collects would precede PyTorch's triton in the parity tests' process, an order that crashes."""
    from sd_jax.data import input_pipeline

    return input_pipeline


WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark: labels 0, 1, 2


def encoded(array, fmt, mode="RGB"):
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def random_picture(rng, height, width):
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/<wnid>/*.JPEG of varied sizes with ImageNet's quirks: a PNG named .JPEG, a CMYK and a
    grayscale JPEG; val/ with two wnids."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    quirks = {("n01443537", 1): ("PNG", "RGB"), ("n01484850", 0): ("JPEG", "CMYK"), ("n01484850", 2): ("JPEG", "L")}
    for split, wnids in (("train", WNIDS), ("val", WNIDS[:2])):
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(3):
                fmt, mode = quirks.get((wnid, i), ("JPEG", "RGB"))
                picture = random_picture(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120)))
                (root / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(encoded(picture, fmt, mode))
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")
    return root


def test_labels_are_the_sorted_wnids_tfds_and_torchvision_use():
    names = imagenet.wnids()
    assert len(names) == 1000 and list(names) == sorted(names) and names[:3] == WNIDS


def test_image_folder_lists_images_with_imagenet_labels(image_folder):
    train = imagenet.image_folder(str(image_folder), "train")
    assert len(train) == 9 and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [p.rsplit("/", 1)[-1] for p in train.paths[:3]] == [f"n01440764_{i}.JPEG" for i in range(3)]
    assert imagenet.image_folder(str(image_folder), "val").labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("index", range(9))
def test_every_file_decodes_to_the_pixels_pil_sees(ip, image_folder, index):
    """The quirks included: PNG bytes behind .JPEG, CMYK and grayscale JPEGs all come out RGB."""
    train = imagenet.image_folder(str(image_folder), "train")
    data = ip.read_encoded(train, index)
    shape = ip.image_shape(data).numpy()
    pixels = ip.decode_window(data, ip.tf.constant([0, 0, *shape])).numpy()
    reference = np.asarray(Image.open(train.paths[index]).convert("RGB"))
    assert pixels.shape == reference.shape and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - reference).max() <= 4  # JPEG decoders differ by a few levels


def test_folder_errors_name_what_is_wrong(image_folder, tmp_path):
    with pytest.raises(DataError, match=r"no folder .*/missing/train.*ImageFolder"):
        imagenet.image_folder(str(tmp_path / "missing"), "train")
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match=r"not ImageNet-1k wnids, e.g. \['cats'\]"):
        imagenet.image_folder(str(tmp_path), "train")
    (tmp_path / "train" / "cats").rmdir()
    (tmp_path / "train" / "n01440764").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        imagenet.image_folder(str(tmp_path), "train")


def test_an_unreadable_file_is_named(ip, image_folder, tmp_path):
    folder = tmp_path / "train" / "n01440764"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"good_{i}.JPEG").write_bytes(encoded(random_picture(np.random.default_rng(i), 50, 60), "JPEG"))
    (folder / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    split = imagenet.image_folder(str(tmp_path), "train")
    indices, dataset = ip.eval_batches(split, batch_size=2, image_size=32)
    with pytest.raises(DataError, match=r"cannot decode .*broken\.JPEG"):
        list(ip.numpy_batches(split, indices, dataset))


def test_batches_have_the_shapes_and_are_a_function_of_seed_epoch_and_step(ip, image_folder):
    train = imagenet.image_folder(str(image_folder), "train")
    first = list(ip.numpy_batches(train, *ip.train_batches(train, seed=3, epoch=2, batch_size=4, image_size=48)))
    assert len(first) == 2  # 9 images in batches of 4: the short last batch is dropped
    images, labels = first[0]
    assert images.shape == (4, 48, 48, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    again = list(ip.numpy_batches(train, *ip.train_batches(train, seed=3, epoch=2, batch_size=4, image_size=48)))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    resumed = list(ip.numpy_batches(train, *ip.train_batches(train, 3, 2, 4, 48, start_step=1)))
    assert len(resumed) == 1 and np.array_equal(resumed[0][0], first[1][0])  # a restart at step 1
    other_epoch = list(ip.numpy_batches(train, *ip.train_batches(train, 3, 3, 4, 48)))
    assert not np.array_equal(other_epoch[0][0], first[0][0])
    order = ip.epoch_order(9, 3, 2)
    assert np.array_equal(np.concatenate([b[1] for b in first]), train.labels[order[:8]])


def test_process_slices_are_disjoint_and_cover_every_global_batch(ip):
    order = ip.epoch_order(1003, seed=0, epoch=1)
    slices = [ip.process_slices(order, 40, p, 4) for p in range(4)]
    assert all(s.shape == (25, 10) for s in slices)
    glued = np.concatenate(slices, axis=1)  # process p's slice sits at columns p*10..p*10+9
    assert np.array_equal(glued.reshape(-1), order[:1000])
    assert np.array_equal(ip.process_slices(order, 40, 2, 4, start_step=7), slices[2][7:])
    with pytest.raises(ValueError, match="divide evenly"):
        ip.process_slices(order, 42, 0, 4)


def test_evaluation_covers_each_image_once_and_pads_with_label_minus_one(ip, image_folder):
    val = imagenet.image_folder(str(image_folder), "val")
    halves = [list(ip.numpy_batches(val, *ip.eval_batches(val, 4, 32, p, 2))) for p in range(2)]
    labels = np.concatenate([np.concatenate([h[b][1] for h in halves]) for b in range(2)])
    assert labels.tolist() == val.labels.tolist() + [-1, -1]


def window_geometry(ip, shape, seed):
    window = ip.random_window(ip.tf.constant(shape, ip.tf.int32), ip.tf.constant([seed, 7], ip.tf.int64)).numpy()
    return window, window[2] * window[3] / (shape[0] * shape[1]), window[3] / window[2]


def test_random_crops_follow_the_area_and_aspect_ranges(ip):
    shape = (375, 500)
    areas, centre = [], ip.centre_window(ip.tf.constant(shape)).numpy().tolist()
    for seed in range(200):
        window, area, aspect = window_geometry(ip, shape, seed)
        assert 0 <= window[0] and window[0] + window[2] <= shape[0] and 0 <= window[1] and window[1] + window[3] <= shape[1]
        if window.tolist() != centre:
            assert 0.08 - 0.01 <= area <= 1.0 and 3 / 4 - 0.02 <= aspect <= 4 / 3 + 0.02  # integer pixels
        areas.append(area)
    assert min(areas) < 0.2 and max(areas) > 0.8  # the whole range is used


def test_impossible_crops_fall_back_to_the_centre_crop(ip):
    shape = (12, 1000)  # no window with aspect 3/4-4/3 covers 8% of this strip
    window, _, _ = window_geometry(ip, shape, 0)
    assert window.tolist() == [(12 - 10 + 1) // 2, (1000 - 10 + 1) // 2, 10, 10]  # 0.875 x 12 = 10.5 -> 10
    # 224 of 256 (0.875), centred; an odd margin puts the extra pixel before the crop, as the flax example
    assert ip.centre_window(ip.tf.constant([256, 341])).numpy().tolist() == [16, (341 - 224 + 1) // 2, 224, 224]


def test_synthetic_images_are_deterministic_jpegs_of_imagenet_like_size(ip):
    split = imagenet.synthetic("train", 50, seed=1)
    assert split.paths is None and len(split) == 50 and len(set(split.labels.tolist())) == 50
    sizes = [tuple(ip.image_shape(ip.synthetic_jpeg(1, i)).numpy()) for i in range(20)]
    assert all(192 <= h < 512 and 192 <= w < 512 for h, w in sizes) and len(set(sizes)) > 10
    assert ip.synthetic_jpeg(1, 4).numpy() == ip.synthetic_jpeg(1, 4).numpy()
    assert ip.synthetic_jpeg(1, 4).numpy() != ip.synthetic_jpeg(2, 4).numpy()


def test_minival_is_one_percent_of_train_spread_over_the_classes():
    train = imagenet.synthetic("train", 5000)
    rest, minival = imagenet.hold_out_minival(train)
    assert len(minival) == 50 and len(rest) == 4950 and minival.name == "minival"
    assert len(set(minival.labels.tolist())) > 40
    combined = np.sort(np.concatenate([rest.labels, minival.labels]))
    assert np.array_equal(combined, np.sort(train.labels))


def tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tfds_manual_dir(image_folder, tmp_path_factory):
    """ImageNet's two official tars holding the ImageFolder's images: the train tar of per-wnid
    tars, the val tar of ILSVRC2012_val_<8 digits>.JPEG files."""
    manual = tmp_path_factory.mktemp("tfds") / "downloads" / "manual"
    manual.mkdir(parents=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in WNIDS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for path in sorted((image_folder / "train" / wnid).glob("*.JPEG")):
                    tar_member(tar, path.name, path.read_bytes())
            tar_member(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, path in enumerate(sorted((image_folder / "val").glob("*/*.JPEG"))):
            tar_member(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", path.read_bytes())
    return manual.parent.parent


def test_the_real_tfds_builder_prepares_the_official_tars_and_agrees_with_the_folder(ip, tfds_manual_dir, image_folder):
    splits = imagenet.tfds_splits(str(tfds_manual_dir))
    train, val = splits["train"], splits["val"]
    assert (len(train), len(val)) == (9, 6)
    folder = imagenet.image_folder(str(image_folder), "train")
    label_of_file = dict(zip((p.rsplit("/", 1)[-1] for p in folder.paths), folder.labels))
    for i in range(len(train)):  # tfds shuffles the records; each keeps its file name and label
        name = train.records[i]["file_name"].decode()
        assert train.labels[i] == label_of_file[name]
        reference = np.asarray(Image.open(image_folder / "train" / name.split("_")[0] / name).convert("RGB"))
        data = ip.read_encoded(train, i)
        assert np.abs(ip.decode_window(data, ip.tf.constant([0, 0, *reference.shape[:2]])).numpy().astype(int)
                      - reference).max() <= 4
    # tfds labels validation images from its list: ILSVRC2012_val_00000001 is a sea snake (n01751748).
    first = [val.records[i]["file_name"] for i in range(len(val))].index(b"ILSVRC2012_val_00000001.JPEG")
    assert imagenet.wnids()[val.labels[first]] == "n01751748"
    images, labels = next(ip.numpy_batches(val, *ip.eval_batches(val, 4, 32)))
    assert images.shape == (4, 32, 32, 3) and labels.tolist() == val.labels[:4].tolist()
    assert np.array_equal(imagenet.tfds_splits(str(tfds_manual_dir))["train"].labels, train.labels)  # cached


def test_without_the_tars_tfds_fails_at_once_naming_them(tmp_path):
    with pytest.raises(DataError) as error:
        imagenet.tfds_splits(str(tmp_path))
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
    assert str(tmp_path / "downloads" / "manual") in message and "data_source='files'" in message


@pytest.mark.slow
def test_bench_input_times_the_loader_and_the_host_fed_step(capsys, tmp_path):
    from sd_jax import bench_input  # imports TensorFlow: see the `ip` fixture

    bench_input.main(["--images", "16", "--image-size", "32", "--batch-size", "4", "--threads", "1,2", "--rounds", "1",
                      "--end-to-end", "--colour", "both", "--steps-per-call", "2", "--calls", "1",
                      "--dir", str(tmp_path)])
    *rows, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["measure"], r.get("threads"), r.get("colour")) for r in rows] == [
        ("loader", 1, None), ("loader", 2, None), ("device_augment", None, "off"), ("device_augment", None, "on"),
        ("end_to_end", 2, "off"), ("end_to_end", 2, "on"), ("device_resident_step", None, None)]
    assert all(r["images_per_s"] > 0 for r in rows) and rows[0]["batches"] == 3
    assert rows[2]["images_per_s"] == pytest.approx(4 / rows[2]["batch_s_median"])
    assert summary["loader_scaling"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])
    assert summary["end_to_end_over_device_step"] == pytest.approx(rows[4]["images_per_s"] / rows[6]["images_per_s"])
    assert summary["colour_on_over_off"] == pytest.approx(rows[5]["images_per_s"] / rows[4]["images_per_s"])
    colour_s = rows[3]["batch_s_median"] - rows[2]["batch_s_median"]
    assert summary["colour_s_per_batch"] == pytest.approx(colour_s)
    assert summary["colour_share_of_step"] == pytest.approx(colour_s / rows[6]["step_s_median"])
    assert len(imagenet.image_folder(str(tmp_path), "train")) == 16  # the ImageFolder it wrote
