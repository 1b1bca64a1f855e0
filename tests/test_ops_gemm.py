"""Split products against the plain product: always bitwise equal, and the choice logic."""

from __future__ import annotations

import pytest
import torch

from loratune.ops import gemm, reference_paths
from loratune.ops.gemm import matmul, matmul_reference


@pytest.fixture(autouse=True)
def fresh_plans():
    gemm.clear_plans()
    yield
    gemm.clear_plans()


def operands(rows, k, n, transposed, bias, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, k, generator=g).to(dtype)
    if transposed:
        b = torch.randn(n, k, generator=g).to(dtype).t()
    else:
        b = torch.randn(k, n, generator=g).to(dtype)
    c = torch.randn(n, generator=g).to(dtype) if bias else None
    return a, b, c


@pytest.mark.parametrize("rows,k,n", [(1024, 576, 576), (1024, 1536, 576), (1000, 576, 192), (2048, 192, 576),
                                      (64, 64, 8192 + 96), (512, 64, 9000)])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_every_call_is_bitwise_the_plain_product(rows, k, n, transposed, bias):
    a, b, c = operands(rows, k, n, transposed, bias)
    expected = matmul_reference(a, b, c)
    out = torch.empty_like(expected)
    for i in range(3 * gemm.TRIALS + 2):  # the first call, the timed trials, then the chosen way
        assert torch.equal(matmul(a, b, c), expected)
        if i % 2:
            out.zero_()
            assert matmul(a, b, c, out=out) is out and torch.equal(out, expected)
    choice, = gemm.plans().values()  # one entry for the shape
    exact = next(iter(gemm.exact_ways().values()))[rows]
    assert choice in exact if len(exact) > 1 else choice is None  # nothing to time: no choice needed


def test_small_fp32_and_reference_products_are_never_planned():
    a, b, _ = operands(gemm.MIN_ROWS - 1, 64, 64, True, False)
    matmul(a, b)
    a32, b32, _ = operands(1024, 64, 64, True, False, dtype=torch.float32)
    assert torch.equal(matmul(a32, b32), a32 @ b32)
    big, bb, _ = operands(1024, 64, 64, True, False)
    with reference_paths():
        matmul(big, bb)
    assert gemm.plans() == {}


def test_halves_that_are_not_bitwise_equal_are_never_used(monkeypatch):
    real = gemm._pieces

    def wrong(*args):  # "faster", but not the same sums
        for rows, cols, a_part, b_part, bias_part in real(*args):
            yield rows, cols, a_part, b_part + 1, bias_part

    monkeypatch.setattr(gemm, "_pieces", wrong)
    a, b, _ = operands(1024, 64, 9000, True, False)
    for _ in range(3 * gemm.TRIALS + 2):
        assert torch.equal(matmul(a, b), a @ b)
    assert next(iter(gemm.exact_ways().values())) == {1024: ("whole",)}


def test_the_choice_needs_a_clear_gain():
    assert gemm.choose({"whole": [1.0, 1.2], "rows": [0.85, 0.9], "cols": [0.88]}) == "rows"
    assert gemm.choose({"whole": [1.0, 1.2], "rows": [0.95, 0.91]}) == "whole"  # within noise
    assert gemm.choose({"whole": [1.0], "cols": [1.5]}) == "whole"


def test_nearby_row_counts_share_a_choice_but_each_is_checked_for_exactness():
    for rows in (1000, 1010, 1024):
        a, b, _ = operands(rows, 64, 64, True, False)
        matmul(a, b)
    assert len(gemm.plans()) == 1
    assert sorted(next(iter(gemm.exact_ways().values()))) == [1000, 1010, 1024]


def test_a_row_count_where_the_chosen_split_is_not_exact_runs_whole(monkeypatch):
    real = gemm._pieces

    def wrong_at_1010(way, a, *args):  # the split sums in another order at 1010 rows only
        for rows, cols, a_part, b_part, bias_part in real(way, a, *args):
            yield rows, cols, a_part, (b_part + 1 if a.shape[0] == 1010 else b_part), bias_part

    monkeypatch.setattr(gemm, "_pieces", wrong_at_1010)
    monkeypatch.setattr(gemm, "choose", lambda times: "rows")  # as if the halves had been faster
    a, b, _ = operands(1024, 64, 64, True, False)
    for _ in range(2 * gemm.TRIALS + 1):
        matmul(a, b)
    assert list(gemm.plans().values()) == ["rows"]
    a2, b2, _ = operands(1010, 64, 64, True, False, seed=1)
    for _ in range(3):
        assert torch.equal(matmul(a2, b2), a2 @ b2)
    assert next(iter(gemm.exact_ways().values()))[1010] == ("whole",)


def test_a_chosen_split_is_the_one_that_runs(monkeypatch):
    monkeypatch.setattr(gemm, "choose", lambda times: "cols")  # as if the pieces had been faster
    a, b, c = operands(64, 64, 9000, True, True)
    expected = matmul_reference(a, b, c)
    for _ in range(2 * gemm.TRIALS + 1):
        matmul(a, b, c)
    assert list(gemm.plans().values()) == ["cols"]
    runs = []
    real = gemm._pieces
    monkeypatch.setattr(gemm, "_pieces", lambda *args: runs.append(args[0]) or real(*args))
    assert torch.equal(matmul(a, b, c), expected)
    assert runs == ["cols"]  # not silently the whole product


@pytest.mark.gpu
def test_cuda_products_always_run_whole():
    a, b, c = (t.cuda() for t in operands(1024, 576, 576, True, True))
    assert torch.equal(matmul(a, b, c), matmul_reference(a, b, c))
    assert gemm.plans() == {}


def test_a_shape_that_runs_whole_checks_no_new_row_count(monkeypatch):
    """Packed batches bring a new row count nearly every step: once a shape has chosen the whole
    product, nothing is run split to check exactness at the new count."""
    monkeypatch.setattr(gemm, "choose", lambda times: "whole")
    a, b, _ = operands(1024, 64, 9000, True, False)
    for _ in range(3 * gemm.TRIALS + 1):
        matmul(a, b)
    assert list(gemm.plans().values()) == ["whole"]
    runs = []
    real = gemm._pieces
    monkeypatch.setattr(gemm, "_pieces", lambda *args: runs.append(args[0]) or real(*args))
    a2, b2, _ = operands(1010, 64, 9000, True, False, seed=1)
    assert torch.equal(matmul(a2, b2), a2 @ b2)
    assert runs == [] and 1010 not in next(iter(gemm.exact_ways().values()))


def test_a_row_count_that_changes_at_every_call_still_reaches_a_choice(monkeypatch):
    """The checks count as timings, so a shape that never repeats a row count (the last loss chunk
    of packed batches) is decided after TRIALS of them and then stops running splits to check."""
    monkeypatch.setattr(gemm, "choose", lambda times: "whole")
    for i in range(gemm.TRIALS):
        a, b, _ = operands(1000 + i, 64, 9000, True, False, seed=i)
        assert torch.equal(matmul(a, b), a @ b)
    assert list(gemm.plans().values()) == ["whole"]
    times = next(iter(gemm._PLANS.values())).times
    assert times.keys() == {"whole", "rows", "cols"} and all(len(t) == gemm.TRIALS for t in times.values())
