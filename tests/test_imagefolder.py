"""Folders of image files as a dataset, random subsets, and the CSV / histogram exports (issue 20).

The folders are written here with Pillow from known integer arrays, so every reader result is
checked against the values that went in.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from idode.cli import main
from idode.config import apply_overrides
from idode.data import load_dataset, parse_subset, select_examples
from idode.evalexports import CSV_FILE, HISTOGRAMS, export_examples, read_csv
from idode.evaluate import evaluate
from idode.presets import get_preset
from idode.train import train
from idode.validation import DatasetError, InputError

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, size=(12, 6, 5), dtype=np.uint8)  # [N, H, W]
RGB = RNG.integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)  # [N, H, W, C]
# a tiny MLP on the grey folder: 256 levels, 1x6x5 images
TINY = ["train.steps=4", "train.batch_size=4", "train.eval_every=0", "train.checkpoint_every=4",
        "model.net=mlp", "model.mlp_hidden=16", "model.mlp_depth=1", "data.name=folder",
        "data.eval_examples=4", "data.ode_eval_examples=2"]  # fmt: skip
FAST = dict(rtol=1e-3, atol=1e-3, batch_size=8, device="cpu", progress=False)


def _write(folder, images, suffix=".png", names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        name = names[i] if names else f"im_{i:02d}{suffix}"
        Image.fromarray(x).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def grey_dir(tmp_path_factory):
    # written in an order other than the sorted one: the reader sorts by name
    names = [f"im_{i:02d}.png" for i in range(len(GREY))]
    folder = tmp_path_factory.mktemp("grey") / "images"
    folder.mkdir()
    for i in reversed(range(len(GREY))):
        Image.fromarray(GREY[i]).save(folder / names[i])
    (folder / "notes.txt").write_text("not an image\n")  # other files are ignored
    return folder


@pytest.fixture(scope="module")
def run(grey_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_run") / "run"
    train(apply_overrides(get_preset("digits_cpu"), [*TINY, f"data.path={grey_dir}"]), out,
          progress=False)  # fmt: skip
    return out


def test_training_on_a_folder_records_it_without_the_file_list(run, grey_dir):
    meta = json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())
    data = meta["extra"]["dataset"]
    assert data["name"] == "folder" and data["path"] == str(grey_dir)
    assert "example_files" not in data and meta["extra"]["data_shape"] == [1, 6, 5]


def test_grey_and_rgb_folders_read_back_exactly(grey_dir, tmp_path):
    ds = load_dataset("folder", "test", path=grey_dir)
    assert ds.num_levels == 256 and ds.shape == (1, 6, 5) and len(ds) == len(GREY)
    np.testing.assert_array_equal(ds.images[:, 0], GREY)
    assert ds.info["example_files"] == [f"im_{i:02d}.png" for i in range(len(GREY))]
    assert ds.info["split_from"] == "the same folder for both splits"
    np.testing.assert_array_equal(load_dataset("folder", "train", path=grey_dir).images, ds.images)

    rgb = load_dataset("folder", "train", path=_write(tmp_path / "rgb", RGB, ".bmp"))
    assert rgb.shape == (3, 6, 5)
    np.testing.assert_array_equal(rgb.images, RGB.transpose(0, 3, 1, 2))  # channels first
    webp = tmp_path / "webp"
    webp.mkdir()
    Image.fromarray(RGB[0]).save(webp / "a.WEBP", lossless=True)  # any case of the suffix
    Image.fromarray(RGB[1]).save(webp / "b.webp", lossless=True)
    np.testing.assert_array_equal(
        load_dataset("folder", "test", path=webp).images, RGB[:2].transpose(0, 3, 1, 2)
    )
    # JPEG is lossy: the decoded pixels are read as they are, close to what was saved
    jpg = load_dataset("folder", "test", path=_write(tmp_path / "jpg", GREY[:3], ".jpg"))
    assert jpg.shape == (1, 6, 5)
    # an opaque alpha channel is dropped without loss; a palette image becomes its colours
    opaque = np.concatenate([RGB[0], np.full((6, 5, 1), 255, np.uint8)], axis=2)
    mixed = tmp_path / "modes"
    _write(mixed, [opaque], names=["a.png"])
    Image.fromarray(RGB[1]).convert("P", palette=Image.Palette.ADAPTIVE).save(mixed / "b.png")
    both = load_dataset("folder", "test", path=mixed)
    np.testing.assert_array_equal(both.images[0], RGB[0].transpose(2, 0, 1))
    expected = np.asarray(Image.open(mixed / "b.png").convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(both.images[1], expected)


def test_train_and_test_subfolders_are_the_splits(tmp_path):
    _write(tmp_path / "d" / "train", GREY[:5])
    _write(tmp_path / "d" / "test", GREY[5:7])
    tr, te = (load_dataset("folder", s, path=tmp_path / "d") for s in ("train", "test"))
    assert (len(tr), len(te)) == (5, 2) and te.info["split_from"] == "subfolder test/"
    np.testing.assert_array_equal(te.images[:, 0], GREY[5:7])
    _write(tmp_path / "e" / "train", GREY[:2])
    with pytest.raises(DatasetError, match=r"train/ subfolder but no test/: give it both"):
        load_dataset("folder", "test", path=tmp_path / "e")


@pytest.mark.parametrize(
    "case, phrase",
    [
        ("size", r"b\.png is grey 7x6 \(width x height\) but a\.png, the first file, is grey 5x6.*"
         r"nothing is resized.*\.resize\(\(5, 6\)\)"),
        ("mode", r"b\.png is RGB 5x6 .* but a\.png, the first file, is grey 5x6.*convert\('L'\)"),
        ("corrupt", r"b\.png is corrupt or not an image .*replace it or remove it"),
        ("truncated", r"b\.png is corrupt or not an image"),
        ("alpha", r"b\.png is transparent in places \(mode RGBA\).*convert\('RGB'\)"),
        ("16-bit", r"b\.png has Pillow mode 'I;16'.*8-bit grey \(L\) or RGB"),
        ("empty", r"holds no image files \(accepted: \.png, \.jpg"),
        ("missing", r"nowhere not found: data\.path must name a folder"),
    ],
)  # fmt: skip
def test_a_bad_folder_is_one_line_naming_the_file(case, phrase, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    if case != "empty":
        Image.fromarray(GREY[0]).save(d / "a.png")
    if case == "size":
        Image.fromarray(np.zeros((6, 7), np.uint8)).save(d / "b.png")
    elif case == "mode":
        Image.fromarray(RGB[0]).save(d / "b.png")
    elif case == "corrupt":
        (d / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    elif case == "truncated":
        Image.fromarray(GREY[1]).save(d / "b.png")
        (d / "b.png").write_bytes((d / "b.png").read_bytes()[:-30])
    elif case == "alpha":
        rgba = np.concatenate([RGB[0], np.zeros((6, 5, 1), np.uint8)], axis=2)
        Image.fromarray(rgba).save(d / "b.png")
    elif case == "16-bit":
        Image.fromarray(np.full((6, 5), 300, np.uint16)).save(d / "b.png")
    path = tmp_path / "nowhere" if case == "missing" else d
    error = FileNotFoundError if case == "missing" else DatasetError
    with pytest.raises(error, match=phrase) as e:
        load_dataset("folder", "train", path=path)
    assert "\n" not in str(e.value)


def test_the_command_line_says_a_bad_folder_in_one_line(tmp_path, capsys):
    d = _write(tmp_path / "d", GREY[:2])
    (d / "c.png").write_bytes(b"not a png")
    argv = ["train", "--config", "digits_cpu", "--set", "data.name=folder", "--set",
            f"data.path={d}", "--out", str(tmp_path / "r"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("idode: error: image ") and "c.png is corrupt" in err
    assert err.count("\n") == 1 and not (tmp_path / "r" / "checkpoints").exists()


def test_subset_spellings():
    assert parse_subset("first", None) == ("first", 0)
    assert parse_subset("random", 5) == ("random", 0)
    assert parse_subset("random:7", 5) == ("random", 7)
    for bad in ("rand", "random:x", "first:3", "random:-1"):
        with pytest.raises(InputError, match="is not valid: use 'first'"):
            parse_subset(bad, 5)
    with pytest.raises(InputError, match="takes --max-examples N"):
        parse_subset("random", None)


def test_random_subset_keeps_the_file_names_and_split_indices(grey_dir):
    ds = load_dataset("folder", "test", path=grey_dir)
    sub = select_examples(ds, 5, "random:2")
    ids = sub.example_ids
    assert ids == sorted(ids) and len(set(ids)) == 5 and ids != list(range(5))
    assert sub.info["subset"]["indices"] == ids and sub.info["subset"]["seed"] == 2
    assert sub.info["example_files"] == [f"im_{i:02d}.png" for i in ids]
    np.testing.assert_array_equal(sub.images, ds.images[ids])
    assert select_examples(ds, 5, "random:2").content_hash() == sub.content_hash()
    assert select_examples(ds, 5).content_hash() != sub.content_hash()


def _jsonl(out):
    return [json.loads(line) for line in (out / "per_example.jsonl").read_text().splitlines()]


def test_folder_evaluation_rows_carry_their_file_and_the_csv_equals_the_json_lines(
    run, grey_dir, tmp_path
):
    res = evaluate(run, tmp_path / "full", **FAST)
    rows = _jsonl(tmp_path / "full")
    assert [r["file"] for r in rows] == [f"im_{i:02d}.png" for i in range(len(GREY))]
    assert [r["index"] for r in rows] == list(range(len(GREY)))
    csv_rows = read_csv(tmp_path / "full" / CSV_FILE)
    assert len(csv_rows) == len(rows) and list(csv_rows[0])[:3] == ["index", "file", "bpd"]
    for key in csv_rows[0]:
        for r, c in zip(rows, csv_rows, strict=True):
            v = r[key]
            assert (float(c[key]) == v) if isinstance(v, float) else (c[key] == str(v)), key
    assert {"bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "elbo_bpd", "nfe"} <= set(
        csv_rows[0]
    )
    for name in HISTOGRAMS.values():
        with Image.open(tmp_path / "full" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert res["files"]["per_example_csv"] == str(tmp_path / "full" / CSV_FILE)

    # a random subset: its rows are the full evaluation's rows of the same split indices (each
    # example's noise hangs on its index), and eval.json records which examples it took
    sub = evaluate(run, tmp_path / "sub", max_examples=4, subset="random:1", **FAST)
    rec = sub["dataset"]["info"]["subset"]
    assert (rec["mode"], rec["n"], rec["seed"], rec["of"]) == ("random", 4, 1, len(GREY))
    sub_rows = _jsonl(tmp_path / "sub")
    assert [r["index"] for r in sub_rows] == rec["indices"]
    assert [r["file"] for r in sub_rows] == [f"im_{i:02d}.png" for i in rec["indices"]]
    for r in sub_rows:
        ref = rows[r["index"]]
        assert math.isclose(r["bpd"], ref["bpd"], abs_tol=1e-6)
        assert math.isclose(r["elbo_bpd"], ref["elbo_bpd"], abs_tol=1e-6)
    picked = load_dataset("folder", "test", path=grey_dir)
    assert sub["dataset"]["content_hash"] == select_examples(picked, 4, "random:1").content_hash()
    assert sub["bpd"]["mean"] == pytest.approx(np.mean([r["bpd"] for r in sub_rows]))


def test_exports_of_one_row_and_of_nested_fields(tmp_path):
    rows = [
        {
            "index": 3,
            "bpd": 1.25,
            "bpd_mean_of_bounds": 1.25,
            "nfe": 38,
            "steps_per_draw": [6],
            "check": {"checked": True, "abs_bpd": 0.001, "draws": [1, 2]},
            "note": None,
        }
    ]
    (tmp_path / "per_example.jsonl").write_text(json.dumps(rows[0]) + "\n")
    files = export_examples(tmp_path, rows, ["cat.png"])
    (row,) = read_csv(files["per_example_csv"])
    assert row == {
        "index": "3",
        "file": "cat.png",
        "bpd": "1.25",
        "bpd_mean_of_bounds": "1.25",
        "nfe": "38",
        "check.checked": "True",
        "check.abs_bpd": "0.001",
        "note": "",
    }
    assert _jsonl(tmp_path)[0]["file"] == "cat.png"  # the JSON lines carry the file too
    for name in HISTOGRAMS.values():
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG"
