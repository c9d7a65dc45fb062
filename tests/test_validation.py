"""Tests for idode.validation: each check accepts good input unchanged and names problem and fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import idode
from idode.validation import (
    DatasetError,
    InputError,
    check_choice,
    check_device,
    check_integer_data,
    check_model_input,
    check_num_levels,
    check_positive,
)


def test_input_errors_are_value_errors() -> None:
    assert issubclass(DatasetError, InputError) and issubclass(InputError, ValueError)


def test_check_choice() -> None:
    assert check_choice("split", "test", ("train", "test")) == "test"
    with pytest.raises(ValueError, match=r"unknown split 'val'; valid: 'train', 'test'"):
        check_choice("split", "val", ("train", "test"))
    with pytest.raises(InputError):
        check_choice("split", "val", ("train", "test"), error=InputError)


@pytest.mark.parametrize("value", [1, 3, 0.5, 1e-12])
def test_check_positive_accepts(value: float) -> None:
    assert check_positive("x", value) == value


@pytest.mark.parametrize("value", [0, -1, 0.0, -1e-5, math.nan, math.inf, True, "1", None])
def test_check_positive_refuses(value: object) -> None:
    with pytest.raises(InputError, match=r"x must be a positive number"):
        check_positive("x", value)


def test_check_positive_integer() -> None:
    assert check_positive("n", 4, integer=True) == 4
    with pytest.raises(InputError, match="n must be a positive integer, got 2.5"):
        check_positive("n", 2.5, integer=True)
    with pytest.raises(InputError, match="got 0"):
        check_positive("n", 0, integer=True)


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_check_device_accepts(spec: str) -> None:
    assert check_device(spec) == spec


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "mps0", "", "cpu:0 "])
def test_check_device_refuses(spec: str) -> None:
    with pytest.raises(
        InputError, match=r"not a device for --device; valid: auto, cpu, cuda, cuda:N"
    ):
        check_device(spec, "--device")


@pytest.mark.parametrize("bad", [1, 0, -3, 2.0, True, "256"])
def test_check_num_levels(bad: object) -> None:
    assert check_num_levels(17) == 17
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        check_num_levels(bad)


def test_check_integer_data() -> None:
    check_integer_data(torch.tensor([[0, 16]]), 17)
    check_integer_data(torch.full((2, 3), 255, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match=r"values in \[0, 17\] but num_levels=17"):
        check_integer_data(torch.tensor([[0, 17]]), 17)
    with pytest.raises(ValueError, match=r"values in \[-1, 3\]"):
        check_integer_data(torch.tensor([[-1, 3]]), 17)
    with pytest.raises(ValueError, match="batched"):
        check_integer_data(torch.tensor([1, 2]), 17)
    with pytest.raises(ValueError, match="empty"):
        check_integer_data(torch.zeros(0, 3, dtype=torch.long), 17)
    with pytest.raises(TypeError, match="torch.Tensor of integers, got ndarray"):
        check_integer_data(np.zeros((2, 2), np.int64), 17)


@pytest.mark.parametrize(
    ("x", "hint"),
    [
        (torch.tensor([[0.0, 0.5, 1.0]]), r"multiply by num_levels - 1 = 255 and round"),
        (torch.tensor([[-0.9, 0.5, 0.99]]), r"already scaled: use them as x directly"),
        (torch.tensor([[3.0, 200.0]]), r"x.round\(\).long\(\)"),
        (torch.tensor([[True, False]]), r"pass the integer grey levels"),
    ],
)
def test_floats_are_refused_with_what_to_pass(x: torch.Tensor, hint: str) -> None:
    with pytest.raises(TypeError, match=rf"integer grey levels in \[0, 256\).*{hint}"):
        check_integer_data(x, 256)
    with pytest.raises(TypeError, match=hint):
        idode.bin_centers(x, 256)


def test_bin_centers_accepts_only_integers_in_range() -> None:
    k = torch.tensor([[0, 1, 16]], dtype=torch.int16)
    np.testing.assert_allclose(
        idode.bin_centers(k, 17, torch.float64).numpy(), (2 * np.array([[0, 1, 16]]) + 1) / 17 - 1
    )
    assert idode.bin_centers(torch.arange(17), 17).shape == (17,)  # unbatched is fine here
    for bad in ([[0, 17]], [[-1, 0]]):
        with pytest.raises(ValueError, match=r"num_levels=17 allows \[0, 16\]"):
            idode.bin_centers(torch.tensor(bad), 17)
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        idode.bin_centers(k, 1)
    # the range check can be skipped for data checked at load time; the dtype check cannot
    assert float(idode.bin_centers(torch.tensor([[17]]), 17, validate=False)) > 1
    with pytest.raises(TypeError):
        idode.bin_centers(torch.tensor([[0.5]]), 17, validate=False)


def test_check_model_input() -> None:
    check_model_input(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"integer images use idode.bin_centers"):
        check_model_input(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty batch"):
        check_model_input(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        check_model_input(torch.tensor([[0.0, math.nan]]))
    with pytest.raises(ValueError, match=r"\[-1, 1\], got max \|x\| = 2"):
        check_model_input(torch.tensor([[0.0, 2.0]]))
    check_model_input(torch.tensor([[0.0, 2.0]]), unit_range=False)
