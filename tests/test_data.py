import cv2
import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data import (SAMPLES_DIR, BadItem, FolderSource, SamplesSource, VideoSource, make_loader, prepare)
from pipeline.models import Preprocess

PRE = Preprocess(32, 36, "area", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def write_video(path, n_frames, size=(48, 64)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size[1], size[0]))
    for i in range(n_frames):
        frame = np.zeros((*size, 3), np.uint8)
        frame[:, :, 1] = i * 10  # frame index readable from the green channel
        writer.write(frame)
    writer.release()


def test_folder_is_recursive_sorted_and_limited(image_folder):
    ids = [it.id for it in FolderSource(image_folder, [".png"]).items]
    assert ids == sorted(ids) and len(ids) == 7 and "sub/deep000.png" in ids
    assert [it.id for it in FolderSource(image_folder, ["png"], limit=2).items] == ids[:2]


def test_missing_or_empty_folder_fails_before_work(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        FolderSource(tmp_path / "nope", [".jpg"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ConfigError, match="no images"):
        FolderSource(tmp_path / "empty", [".jpg"])


def test_samples_are_bundled_with_licences():
    ids = [it.id for it in SamplesSource().items]
    assert ids == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    licences = (SAMPLES_DIR / "LICENSES.md").read_text()
    assert all(name in licences for name in ids) and "CC0" in licences and "public domain" in licences


def test_prepare_crops_resizes_and_normalises():
    img = np.zeros((60, 80, 3), np.uint8)
    img[10:30, 20:60] = 255
    x, display = prepare(img, [20, 10, 40, 20], PRE)  # exactly the white box
    assert x.shape == (3, 32, 32) and display.shape == (32, 32, 3)
    assert np.all(display == 255) and float(x.min()) == pytest.approx(1.0)
    with pytest.raises(BadItem, match="does not fit"):
        prepare(img, [70, 0, 20, 20], PRE)


def test_corrupt_image_becomes_a_skip_record(image_folder):
    (image_folder / "broken.png").write_bytes(b"\x89PNG not really")
    source = FolderSource(image_folder, [".png"])
    batches = list(make_loader(source, source.items, None, PRE, batch_size=4, num_workers=0))
    skipped = [s for b in batches for s in b.skipped]
    assert [s.id for s in skipped] == ["broken.png"] and "decode" in skipped[0].reason
    assert sum(len(b.items) for b in batches) == 7


def test_loader_decodes_in_worker_processes(image_folder):
    source = FolderSource(image_folder, [".png"])
    batches = list(make_loader(source, source.items, None, PRE, batch_size=3, num_workers=2))
    assert [it.id for b in batches for it in b.items] == [it.id for it in source.items]
    assert batches[0].x.shape == (3, 3, 32, 32) and batches[0].display.dtype == np.uint8


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_equal_each_item_prepared_alone_to_the_bit(image_folder, workers):
    """Workers send the uint8 crop and the batch is normalised in one go (loader.model_input):
    the same numbers as base.prepare on each image, channels-last in memory as decoded."""
    import torch

    source = FolderSource(image_folder, [".png"])
    batches = list(make_loader(source, source.items, None, PRE, batch_size=4, num_workers=workers))
    for batch in batches:
        alone = np.stack([prepare(cv2.cvtColor(cv2.imread(it.source), cv2.COLOR_BGR2RGB), None, PRE)[0].numpy()
                          for it in batch.items])
        assert np.array_equal(batch.x.numpy(), alone)
        assert batch.x.is_contiguous(memory_format=torch.channels_last)
        assert np.array_equal(batch.display, np.stack([prepare(cv2.cvtColor(cv2.imread(it.source), cv2.COLOR_BGR2RGB),
                                                               None, PRE)[1] for it in batch.items]))


def test_clip_batches_equal_each_clip_prepared_alone(tmp_path):
    from pipeline.data.base import prepare_array
    from pipeline.data.loader import model_input

    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 40, 48, 3), dtype=np.uint8)
    crops = np.stack([np.stack([prepare_array(f, None, PRE)[1] for f in clip]) for clip in clips])
    x = model_input(crops, PRE)
    assert x.shape == (2, 3, 3, 32, 32) and x.is_contiguous()
    assert np.array_equal(x.numpy(), np.stack([prepare_array(clip, None, PRE)[0] for clip in clips]))


def test_video_frames_and_range_past_the_end(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 12)
    source = VideoSource(str(path), start=1, stop=20, step=3)
    assert [it.frame for it in source.items] == [1, 4, 7, 10]
    assert [it.id for it in source.items][0] == "clip.mp4@000001"
    (skip,) = source.skipped
    assert skip.frame == 13 and "past the end" in skip.reason and "13..19" in skip.reason
    pre = Preprocess(32, 32, "area", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for num_workers in (0, 2):
        batches = list(make_loader(source, source.items, None, pre, 2, num_workers))
        greens = [int(round(float(b.x[i, 1].mean()) * 255 / 10)) for b in batches for i in range(len(b.items))]
        assert greens == [1, 4, 7, 10]  # exact frames, seeking or decoding through
    assert len(VideoSource(str(path), step=5, limit=2).items) == 2


def test_video_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        VideoSource(str(tmp_path / "none.mp4"))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ConfigError):
        VideoSource(str(tmp_path / "bad.mp4"))
