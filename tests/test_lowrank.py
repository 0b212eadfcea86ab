"""The shared low-rank algebra (fedlora.lowrank) that the methods and the export both use."""

import torch

from fedlora.export import compress, stack_updates
from fedlora.lowrank import stack_factors, svd_factors


def test_stacked_factors_carry_the_sum_of_products():
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(6, r, generator=g) for r in (1, 2, 3)]
    As = [torch.randn(r, 5, generator=g, dtype=torch.float64) for r in (1, 2, 3)]
    B, A = stack_factors(Bs, As)
    assert B.dtype == A.dtype == torch.float32 and B.shape == (6, 6) and A.shape == (6, 5)
    want = sum(b.double() @ a for b, a in zip(Bs, As))
    torch.testing.assert_close((B @ A).double(), want, rtol=1e-5, atol=1e-5)


def test_svd_factors_are_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(7, 5, generator=g, dtype=torch.float64)
    B, A, S = svd_factors(delta, 2)
    assert B.shape == (7, 2) and A.shape == (2, 5)
    torch.testing.assert_close(torch.linalg.norm(delta - B @ A), S[2:].norm())
    full_B, full_A, _ = svd_factors(delta, 9)  # a rank above min(m, n) keeps everything
    torch.testing.assert_close(full_B @ full_A, delta)


def test_export_compresses_and_stacks_with_the_shared_algebra():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(8, 4, generator=g), torch.randn(4, 6, generator=g)
    Bc, Ac, error = compress(B, A, 2)
    _, _, S = svd_factors(B.double() @ A.double(), 2)
    assert abs(error - float(S[2:].norm() / S.norm())) < 1e-12 and Bc.shape == (8, 2) and Ac.shape == (2, 6)
    # three rank-3 parts of a 4 x 5 module stack to rank 9 > min(4, 5): re-factored at 4, product kept
    parts = [{"m": (torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g))} for _ in range(3)]
    Bs, As = stack_updates(parts, {"m": (4, 5)})["m"]
    assert Bs.shape == (4, 4) and As.shape == (4, 5)
    want = sum(b @ a for p in parts for b, a in [p["m"]])
    torch.testing.assert_close(Bs @ As, want, rtol=1e-4, atol=1e-4)
