"""idode.rundir's atomic writers: a target is complete or untouched, never half-written."""

from __future__ import annotations

import numpy as np
import pytest

from idode.rundir import atomic_path, read_json, write_json_atomic, write_text_atomic


def test_atomic_path_replaces_the_target_only_on_success(tmp_path):
    target = tmp_path / "samples.npz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz" and tmp != target
        np.savez_compressed(tmp, x=np.arange(3))  # np.savez keeps a name ending in .npz
        assert not target.exists()  # nothing at the target until the writer is done
    with np.load(target) as z:
        assert z["x"].tolist() == [0, 1, 2]

    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        np.savez_compressed(tmp, x=np.arange(5))
        raise RuntimeError("killed mid-write")
    with np.load(target) as z:  # the earlier file, untouched
        assert z["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary left


def test_figures_through_atomic_path_keep_their_format(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    with atomic_path(tmp_path / "f.png") as tmp:
        fig.savefig(tmp)  # the format follows the temporary name's suffix
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_text_and_json_atomic(tmp_path):
    write_text_atomic(tmp_path / "a.md", "old")
    write_text_atomic(tmp_path / "a.md", "new\n")
    assert (tmp_path / "a.md").read_text() == "new\n"
    write_json_atomic(tmp_path / "b.json", {"x": np.float64(1.5)})
    assert read_json(tmp_path / "b.json") == {"x": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.json"]
