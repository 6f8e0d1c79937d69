import pytest
import torch

from curlora.sampling import module_generator, sample_indices, selection_probabilities


def test_probabilities_follow_the_paper():
    w = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 3.0]])  # out=2, in=3
    col_sq = torch.tensor([2.0, 4.0, 9.0])
    standard = selection_probabilities(w, dim=1, mode="standard")
    torch.testing.assert_close(standard, col_sq / col_sq.sum())
    inverse = selection_probabilities(w, dim=1, mode="inverse")
    inv = 1 / (col_sq / col_sq.sum())
    torch.testing.assert_close(inverse, inv / inv.sum())
    rows = selection_probabilities(w, dim=0, mode="standard")
    torch.testing.assert_close(rows, torch.tensor([5.0, 10.0]) / 15)
    uniform = selection_probabilities(w, dim=1, mode="uniform")
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 3))


def test_same_seed_same_indices_different_seed_different():
    w = torch.randn(64, 48)
    a = sample_indices(w, 8, generator=module_generator(0, "layer.q_proj", "cpu"))
    b = sample_indices(w, 8, generator=module_generator(0, "layer.q_proj", "cpu"))
    c = sample_indices(w, 8, generator=module_generator(1, "layer.q_proj", "cpu"))
    d = sample_indices(w, 8, generator=module_generator(0, "layer.k_proj", "cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, d))


def test_inverse_mode_prefers_low_norm_columns():
    # Column norms grow with the index: inverse sampling must pick the low half more often.
    scales = torch.linspace(0.2, 2.0, 100)
    w = torch.randn(100, 100, generator=torch.Generator().manual_seed(0)) * scales
    gen = module_generator(0, "w", "cpu")
    inv_cols = torch.cat([sample_indices(w, 50, "inverse", generator=gen)[0] for _ in range(40)])
    std_cols = torch.cat([sample_indices(w, 50, "standard", generator=gen)[0] for _ in range(40)])
    col_norms = w.pow(2).sum(0)
    assert col_norms[inv_cols].mean() < 0.5 * col_norms[std_cols].mean()
    assert (inv_cols < 50).float().mean() > 0.8 and (std_cols < 50).float().mean() < 0.3


def test_without_replacement_gives_distinct_indices():
    w = torch.randn(32, 32)
    cols, rows = sample_indices(w, 32, replacement=False, generator=module_generator(0, "x", "cpu"))
    assert sorted(cols.tolist()) == list(range(32)) and sorted(rows.tolist()) == list(range(32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_sample_without_overflow(dtype):
    # Values of 1,000 square to 1e6, far beyond fp16's 65,504: the reference code overflowed here.
    w = (torch.randn(256, 256) * 1000).to(dtype)
    p = selection_probabilities(w, dim=1, mode="inverse")
    assert p.dtype == torch.float32 and torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-5
    cols, rows = sample_indices(w, 16, generator=module_generator(0, "x", "cpu"))
    assert cols.shape == rows.shape == (16,)


def test_paper_formula_where_defined():
    """Without dead columns the probabilities are exactly (1/p) / Σ(1/p), p the squared-norm share."""
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(3))
    share = w.pow(2).sum(0) / w.pow(2).sum()
    expected = (1 / share) / (1 / share).sum()
    assert torch.allclose(selection_probabilities(w, dim=1, mode="inverse"), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [0.0, 1e-8])
@pytest.mark.parametrize("mode", ["inverse", "standard", "uniform"])
def test_dead_columns_and_rows_are_never_drawn(scale, mode):
    """A zero (or negligible) column took almost all the inverse probability: every draw picked it,
    C was zero and the adapter could never learn. It must get probability 0 and never be drawn."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    w[:, 5] *= scale
    w[7, :] *= scale
    col_p = selection_probabilities(w, dim=1, mode=mode)
    row_p = selection_probabilities(w, dim=0, mode=mode)
    assert col_p[5] == 0 and row_p[7] == 0
    assert abs(float(col_p.sum()) - 1) < 1e-5
    # Elsewhere the paper's formula over the usable columns.
    keep = torch.arange(64) != 5
    share = w.pow(2).sum(0)[keep] / w.pow(2).sum()
    if mode == "inverse":
        assert torch.allclose(col_p[keep], (1 / share) / (1 / share).sum(), rtol=1e-5)
    for seed in range(20):
        cols, rows = sample_indices(w, 8, mode, generator=module_generator(seed, "x", "cpu"))
        assert 5 not in cols.tolist() and 7 not in rows.tolist()
        assert w[:, cols].abs().sum(0).min() > 0 and w[rows].abs().sum(1).min() > 0


def test_a_small_but_live_column_keeps_the_paper_share():
    """Above the negligible share the formula stands: a weak column is the likeliest, as the paper wants."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    w[:, 9] *= 1e-3
    p = selection_probabilities(w, dim=1, mode="inverse")
    assert int(p.argmax()) == 9 and 0 < float(p[9]) < 1


def test_too_few_live_columns_for_distinct_draws_is_refused():
    w = torch.zeros(16, 16)
    w[:, :3] = torch.randn(16, 3)
    with pytest.raises(ValueError, match="Only 3 of the weight's 16 columns carry any weight.*r=4"):
        sample_indices(w, 4, replacement=False, generator=module_generator(0, "x", "cpu"))
    cols, _ = sample_indices(w, 4, replacement=True, generator=module_generator(0, "x", "cpu"))
    assert set(cols.tolist()) <= {0, 1, 2}


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="smaller side"):
        sample_indices(w, 5)
    with pytest.raises(ValueError, match="sampling mode"):
        selection_probabilities(w, dim=1, mode="bogus")
    with pytest.raises(ValueError, match="all zero"):
        selection_probabilities(torch.zeros(4, 4), dim=1, mode="inverse")


def test_module_generator_seed_is_the_first_8_sha256_bytes_little_endian_63_bits():
    """The documented derivation, written out: indices are reproducible across runs and Python versions."""
    import hashlib

    for seed, name in [(0, "layer"), *((7, f"model.layers.{i}.self_attn.q_proj") for i in range(16))]:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        expected = int.from_bytes(digest[:8], "little") % 2**63
        assert module_generator(seed, name, "cpu").initial_seed() == expected


def test_sampling_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"^Cannot sample CUR indices from a weight that is all zero or not finite\.$"):
        sample_indices(torch.zeros(4, 4), 2)
    with pytest.raises(ValueError, match=r"^CUR sampling needs a 2-D weight, got shape \(2, 3, 4\)\.$"):
        selection_probabilities(torch.ones(2, 3, 4), dim=1, mode="inverse")
    w = torch.ones(6, 6)
    w[2:, :] = 0  # 2 live rows, 6 live columns
    with pytest.raises(ValueError, match=r"^Only 2 of the weight's 6 rows carry any weight"):
        sample_indices(w, 3, replacement=False)


def test_rows_are_drawn_with_replacement_when_asked():
    """One row holds almost all of ||W||²: with replacement (standard mode) it is drawn again and again."""
    w = torch.ones(8, 8)
    w[0] = 1000.0
    cols, rows = sample_indices(w, 8, mode="standard", replacement=True, generator=module_generator(0, "x", "cpu"))
    assert rows.tolist().count(0) >= 6
    _, distinct = sample_indices(w, 8, mode="standard", replacement=False, generator=module_generator(0, "x", "cpu"))
    assert sorted(distinct.tolist()) == list(range(8))
