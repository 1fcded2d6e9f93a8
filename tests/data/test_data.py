"""Data: the bundled digits, rank-independent batches, and clear errors for missing datasets."""
import pytest
import torch

from hpc_bkd.config import DataConfig
from hpc_bkd.data.batches import DataError, train_batch
from hpc_bkd.data.sources import load_data


def test_digits_offline_split_is_fixed():
    a, b = load_data(DataConfig()), load_data(DataConfig())
    assert a.input_shape == (3, 32, 32) and a.num_classes == 10
    assert len(a.test) == 360 and len(a.train) + len(a.val) == 1437
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.val.labels, b.val.labels)


def test_batches_depend_on_epoch_and_step_only():
    data = load_data(DataConfig(augment="crop-flip"))
    x1, y1 = train_batch(data, 32, seed=0, epoch=2, step=3, augment="crop-flip")
    torch.manual_seed(123)  # global RNG state must not matter
    x2, y2 = train_batch(data, 32, seed=0, epoch=2, step=3, augment="crop-flip")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = train_batch(data, 32, seed=0, epoch=3, step=3)
    assert not torch.equal(x1, x3)


@pytest.mark.parametrize("dataset, expected", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_names_the_layout(tmp_path, dataset, expected):
    with pytest.raises(DataError, match=expected):
        load_data(DataConfig(dataset=dataset, root=str(tmp_path)))


def test_missing_root_is_clear(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path / "nope")))


def test_imagefolder_layout_error_and_success(tmp_path):
    with pytest.raises(DataError, match="train/<class>"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 24), (i * 40, 0, 200 if cls == "a" else 0)).save(tmp_path / split / cls / f"{i}.png")
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25))
    assert data.input_shape == (3, 16, 16) and data.num_classes == 2 and len(data.test) == 8


def test_a_dataset_read_from_files_needs_a_root():
    """Checked by the dataset's source when the data is loaded (the config takes any registered name)."""
    with pytest.raises(DataError, match="data.root: required"):
        load_data(DataConfig(dataset="cifar10"))
    with pytest.raises(DataError, match="unknown data.dataset 'nosuch'; valid: digits, cifar10"):
        load_data(DataConfig(dataset="nosuch"))
