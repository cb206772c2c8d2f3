"""Where models come from and where they go (models.py): what --model accepts, what it refuses
up front, and the checkpoint --save-model writes."""

import os
import stat

import pytest

from randbp_cli.models import load_model, save_model


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_model_directory_honours_the_umask(tmp_path, umask, mask):
    """--save-model's directory was mkdtemp's 0700, renamed into place."""
    umask(mask)
    saved = tmp_path / "model"
    save_model(load_model("roberta-tiny", offline=True).model, None, saved)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((saved / "config.json").stat().st_mode) == 0o666 & ~mask
