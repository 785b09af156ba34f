"""data.annotations (CSV, Pascal VOC, COCO), boxes in model-input pixels, and target=label."""
import json
import logging

import h5py
import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data import FolderSource, Item
from pipeline.data.annotations import LABEL_REASON, load_annotations, match_ids
from pipeline.data.boxes import batch_boxes, input_boxes
from pipeline.preprocess import Preprocess
from pipeline.runner import plan, run
from pipeline.store import open_run
from pipeline.targets import TargetSpec
from tests.conftest import tiny_overrides

NAMES = ["tabby", "tiger cat", "Egyptian cat", "goldfish"]
IDS = ["a.jpg", "sub/b.jpg", "sub/c.jpg", "other/c.jpg"]


def write(path, text):
    path.write_text(text)
    return path


def voc(filename, *objects):
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>100</width><height>80</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


# -- formats -----------------------------------------------------------------------------------------
def test_csv_rows_give_boxes_labels_and_label_only_rows(tmp_path):
    path = write(tmp_path / "a.csv", "id,class,x,y,w,h\n"
                 "a.jpg,Tiger Cat,1,2,3,4\n"
                 "a.jpg,0,5,6,7,8\n"
                 "\n"
                 "sub/b.jpg,goldfish,,,,\n")
    ann = load_annotations(path, IDS, NAMES)
    assert ann.boxes["a.jpg"] == [(1, 1.0, 2.0, 3.0, 4.0), (0, 5.0, 6.0, 7.0, 8.0)]
    assert ann.label("a.jpg") == 1  # the first annotated class in file order
    assert ann.label("sub/b.jpg") == 3 and ann.boxes["sub/b.jpg"] == []
    assert ann.names["a.jpg"] == ["Tiger Cat", "0"]
    assert ann.label("sub/c.jpg") is None
    assert ann.boxes_of("a.jpg", 0) == [(0, 5.0, 6.0, 7.0, 8.0)]
    np.testing.assert_array_equal(ann.label_array(["sub/b.jpg", "a.jpg"]), [[3], [1]])


def test_voc_folder_is_one_based_inclusive(tmp_path):
    folder = tmp_path / "voc"
    folder.mkdir()
    write(folder / "1.xml", voc("a.jpg", ("goldfish", (1, 1, 10, 20)), ("tabby", (5, 6, 5, 6))))
    write(folder / "2.xml", voc("b.jpg", ("egyptian cat", (11, 21, 30, 40))))
    ann = load_annotations(folder, IDS, NAMES)
    assert ann.boxes["a.jpg"] == [(3, 0.0, 0.0, 10.0, 20.0), (0, 4.0, 5.0, 1.0, 1.0)]
    assert ann.boxes["sub/b.jpg"] == [(2, 10.0, 20.0, 20.0, 20.0)]  # matched by its unique basename
    assert ann.label("a.jpg") == 3


def test_coco_file_resolves_categories_by_name(tmp_path):
    data = {"images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
                       {"id": 8, "file_name": "sub/c.jpg", "width": 100, "height": 80}],
            "annotations": [{"image_id": 8, "category_id": 17, "bbox": [1.5, 2, 3, 4]},
                            {"image_id": 7, "category_id": 3, "bbox": [0, 0, 10, 10]},
                            {"image_id": 7, "category_id": 17, "bbox": [5, 5, 1, 1]}],
            "categories": [{"id": 3, "name": "goldfish"}, {"id": 17, "name": "TABBY"}]}
    ann = load_annotations(write(tmp_path / "c.json", json.dumps(data)), IDS, NAMES)
    assert ann.boxes["sub/c.jpg"] == [(0, 1.5, 2.0, 3.0, 4.0)]  # exact id, though the basename is shared
    assert ann.boxes["a.jpg"] == [(3, 0.0, 0.0, 10.0, 10.0), (0, 5.0, 5.0, 1.0, 1.0)]
    assert ann.label("a.jpg") == 3


def test_ids_match_exactly_or_by_a_unique_basename():
    assert match_ids(["a.jpg", "b.jpg", "c.jpg", "x/sub/b.jpg", "nope.jpg"], IDS) == {
        "a.jpg": "a.jpg", "b.jpg": "sub/b.jpg", "x/sub/b.jpg": "sub/b.jpg"}  # c.jpg: two inputs


def test_unmatched_ids_are_one_warning_with_a_count(tmp_path, caplog):
    path = write(tmp_path / "a.csv", "id,class,x,y,w,h\nzz1.jpg,0,,,,\nzz2.jpg,0,,,,\nzz1.jpg,1,,,,\na.jpg,0,,,,\n")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        ann = load_annotations(path, IDS, NAMES)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "2 annotated id(s) match no input" in warning and "'zz1.jpg'" in warning
    assert ann.labels == {"a.jpg": 0}


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("id,label,x,y,w,h\na.jpg,0,1,1,1,1\n", "line 1: expected the header id,class,x,y,w,h"),
    ("", "expected the header"),
    ("id,class,x,y,w,h\na.jpg,0,1,1,1\n", "line 2: expected 6 columns"),
    ("id,class,x,y,w,h\na.jpg,0,1,1,1,1\na.jpg,0,1,1,-2,1\n", "line 3: a box needs w, h >= 0"),
    ("id,class,x,y,w,h\na.jpg,0,1,one,1,1\n", "line 2: y='one' is not a number"),
    ("id,class,x,y,w,h\na.jpg,0,1,,1,1\n", "line 2: y='' is not a number"),
    ("id,class,x,y,w,h\na.jpg,,1,1,1,1\n", "line 2: id and class must not be empty"),
    ("id,class,x,y,w,h\na.jpg,tabbby,1,1,1,1\n", "line 2: class 'tabbby' is not a class name of this model; closest: 'tabby'"),
    ("id,class,x,y,w,h\na.jpg,4,1,1,1,1\n", "line 2: class 4 is not a class index of this model (0..3)"),
    ("id,class,x,y,w,h\na.jpg,-1,1,1,1,1\n", "class -1 is not a class index"),
])
def test_bad_csv_is_a_config_error_naming_the_line(tmp_path, text, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(ConfigError, match="bad.csv") as err:
        load_annotations(path, IDS, NAMES)
    assert message in str(err.value)


def test_missing_and_unknown_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_annotations(tmp_path / "none.csv", IDS, NAMES)
    with pytest.raises(ConfigError, match="expected a .csv file, a .json"):
        load_annotations(write(tmp_path / "a.txt", "x"), IDS, NAMES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without Pascal VOC .xml files"):
        load_annotations(tmp_path / "empty", IDS, NAMES)
    with pytest.raises(ConfigError, match="has no class names"):
        load_annotations(write(tmp_path / "n.csv", "id,class,x,y,w,h\na.jpg,tabby,,,,\n"), IDS, None, 10)
    assert load_annotations(tmp_path / "n.csv", IDS, NAMES).label("a.jpg") == 0


@pytest.mark.parametrize("xml, message", [
    ("<annotation><filename>a.jpg", "not a readable XML file"),
    ("<annotation><object><name>tabby</name></object></annotation>", "<filename> is missing"),
    (voc("a.jpg", ("tabby", (1, 1, "x", 4))), "object 1: xmax='x' is not a number"),
    (voc("a.jpg", ("tabby", (1, 1, 2, 2)), ("tabby", (5, 1, 2, 4))), "object 2: xmax < xmin"),
    (voc("a.jpg", ("lion", (1, 1, 2, 2))), "object 1: class 'lion' is not a class name"),
])
def test_bad_voc_is_a_config_error_naming_the_file_and_object(tmp_path, xml, message):
    folder = tmp_path / "voc"
    folder.mkdir()
    write(folder / "bad.xml", xml)
    with pytest.raises(ConfigError, match="bad.xml") as err:
        load_annotations(folder, IDS, NAMES)
    assert message in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("categories"), "needs the lists images, annotations and categories"),
    (lambda d: d["images"][0].pop("file_name"), "every image needs id and file_name"),
    (lambda d: d["annotations"][1].update(image_id=99), "annotations[1]: image_id 99 is not in images"),
    (lambda d: d["annotations"][1].update(category_id=5), "annotations[1]: category_id 5 is not in categories"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), "annotations[1]: bbox must be [x, y, w, h]"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3, -4]), "annotations[1]: a box needs w, h >= 0"),
])
def test_bad_coco_is_a_config_error_naming_the_entry(tmp_path, change, message):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}] * 2,
            "categories": [{"id": 1, "name": "tabby"}]}
    data["annotations"] = [dict(a) for a in data["annotations"]]
    change(data)
    with pytest.raises(ConfigError, match="bad.json") as err:
        load_annotations(write(tmp_path / "bad.json", json.dumps(data)), IDS, NAMES)
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        load_annotations(write(tmp_path / "broken.json", "{"), IDS, NAMES)


# -- boxes in model-input pixels ---------------------------------------------------------------------
def pre(input_size=224, resize=256):
    return Preprocess(input_size, resize, "area", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_input_boxes_follow_resize_and_centre_crop_of_a_wide_image():
    # 400x200 (W x H) -> shorter side 256: 512x256, scale 1.28; centre 224: left 144, top 16.
    boxes = input_boxes([(200, 100, 50, 25), (0, 0, 10, 10), (390, 190, 10, 10)], (400, 200), None, pre())
    np.testing.assert_allclose(boxes, [[200 * 1.28 - 144, 100 * 1.28 - 16, 64, 32]], rtol=1e-6)  # corners dropped


def test_input_boxes_apply_the_crop_box_and_clip_to_the_input():
    # crop [100, 50, 300, 100] of any image: 300x100 -> 768x256 (scale 2.56), left 272, top 16.
    boxes = input_boxes([(200, 60, 100, 30), (220, 80, 10, 10), (350, 0, 100, 200)], (1000, 1000),
                        [100, 50, 300, 100], pre())
    # box 1: x (200 - 100) * 2.56 - 272 = -16 .. 240, clipped to 0 .. 224; y (60 - 50) * 2.56 - 16 = 9.6
    # box 3 starts right of the input, (350 - 100) * 2.56 - 272 = 368 > 224: dropped
    np.testing.assert_allclose(boxes, [[0, 9.6, 224, 30 * 2.56], [(220 - 100) * 2.56 - 272, (80 - 50) * 2.56 - 16,
                                                                  25.6, 25.6]], rtol=1e-5)
    tall = input_boxes([(0, 0, 30, 90)], (30, 90), None, pre(32, 32))  # 30x90 -> 32x96, top 32
    np.testing.assert_allclose(tall, [[0, 0, 32, 32]], rtol=1e-6)
    assert input_boxes([], (30, 90), None, pre()).shape == (0, 4)


def test_batch_boxes_picks_each_targets_class_and_reads_the_size_from_the_header(tmp_path, image_folder):
    source = FolderSource(image_folder, [".png"])
    assert source.image_size(source.items[0]) == (48, 40)  # write_images: 40 rows x 48 columns
    path = write(tmp_path / "a.csv", "id,class,x,y,w,h\nimg000.png,1,8,0,16,20\nimg000.png,2,0,0,48,40\n")
    ann = load_annotations(path, [it.id for it in source.items], None, 10)
    ann.bind(source.items)
    boxes = batch_boxes(ann, source, None, pre(32, 32), ["img000.png", "img001.png"], np.array([[1, 2], [1, 2]]))
    # 48x40 -> 38x32 (scale 0.8, round(38.4) = 38), left 3
    np.testing.assert_allclose(boxes[0][0], [[8 * 38 / 48 - 3, 0, 16 * 38 / 48, 16]], rtol=1e-5)
    np.testing.assert_allclose(boxes[0][1], [[0, 0, 32, 32]])
    assert boxes[1][0].shape == (0, 4) and boxes[1][1].shape == (0, 4)


def test_a_video_source_reports_its_frame_size(tmp_path):
    import cv2

    from pipeline.data import VideoSource

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    source = VideoSource(str(path))
    assert source.image_size(source.items[0]) == (64, 48) == source.image_size(Item("x", str(path), 1))


# -- target=label ------------------------------------------------------------------------------------
def test_label_target_needs_annotations_and_explicit_targets(make_cfg, image_folder, tiny_checkpoint):
    assert TargetSpec.parse("label").k == 1
    with pytest.raises(ValueError, match="explicit targets"):
        TargetSpec.parse("label").select(np.zeros((1, 3)))
    with pytest.raises(ConfigError, match="target=label .* needs data.annotations"):
        plan(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=gradcam", "target=label")))
    with pytest.raises(ConfigError, match="evaluate.pointing=true .* needs data.annotations"):
        plan(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=gradcam", "evaluate.pointing=true")))


def test_target_label_explains_each_inputs_label_and_skips_unlabelled(make_cfg, image_folder, tiny_checkpoint,
                                                                      tmp_path, caplog):
    labels = {"img000.png": 3, "img001.png": 7, "img002.png": 0, "img003.png": 9, "sub/deep000.png": 5,
              "deep001.png": 2}  # img004.png has none; deep001.png matches sub/deep001.png by its basename
    path = write(tmp_path / "labels.csv", "id,class,x,y,w,h\n" + "".join(f"{i},{c},,,,\n" for i, c in labels.items()))
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,saliency]", "layers=[relu2]",
                                   "target=label", f"data.annotations={path}", "evaluate.deletion=true",
                                   "evaluate.steps=2", "render.png=false"))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = run(cfg, tmp_path / "run")
    assert summary.done == 6 and summary.skipped == 1
    assert any("1 input(s) have no label" in r.getMessage() for r in caplog.records)
    with open_run(tmp_path / "run") as r, h5py.File(tmp_path / "run" / "maps.h5", "r", locking=False) as f:
        expected = {**labels, "sub/deep001.png": labels["deep001.png"]}
        assert {i: int(t) for i, t in zip(r.ids(), f["target"][:, 0])} == {
            i: c for i, c in expected.items() if i != "deep001.png"}
        assert [(s.id, s.reason) for s in r.skipped()] == [("img004.png", LABEL_REASON)]
        assert f["gradcam/relu2/cam.deletion_auc"].shape == (6, 1)
