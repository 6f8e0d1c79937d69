"""CUR sampling: which columns of W become C and which rows become R.

Pure tensor code. Probabilities are always computed in float32 (squaring fp16 weights
overflowed in the reference code) on the weight's own device, and every draw comes from a
``torch.Generator`` seeded by (config seed, module name), so the same model and config give
the same C and R on every run and machine.

Dead columns and rows: the paper's inverted probability 1 / share is undefined for an all-zero
column (share 0) and gives almost all the probability to one whose share is below float32's
resolution of ||W||_F² (the reference clamped it, so on a 64 × 64 weight with one zero column every
draw was that column, C = 0 and the layer's adapter could never learn). Such a column (or row)
carries nothing into C·U·R, so it is left out of the draw, in every mode: a share below
:data:`NEGLIGIBLE_SHARE` has probability 0. Every other column keeps the paper's formula, so a
weight without such columns (every layer of the real models tried) gets exactly the paper's draw.
Fewer than r usable columns or rows is an error where r distinct ones are asked for.

Duplicates: with replacement (the paper's default) an index can be drawn twice; the duplicate
column of C / row of R is kept as is, so C·U·R simply has rank below r for that layer and U
still has r² entries. ``replacement=False`` draws r distinct indices.
"""

from __future__ import annotations

import hashlib

import torch

from curlora.config import SAMPLING_MODES

# A column (row) whose share of ||W||_F² is below this is left out of the draw: 1e-12 of the total
# is beneath float32's resolution of the sum (eps ≈ 1.2e-7 per addition over thousands of terms),
# so such a column cannot be told from an all-zero one, and a C or R built from it carries nothing.
NEGLIGIBLE_SHARE = 1e-12


def probabilities_from_norms(squared_norms: torch.Tensor, mode: str) -> torch.Tensor:
    """Selection probabilities from the squared norms of the columns (or rows) of a weight.

    ``inverse`` (the paper): p ∝ 1 / (squared norm share), favouring low-norm columns/rows.
    ``standard`` (classic CUR): p ∝ squared norm. ``uniform``: all equal.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"Unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}.")
    n = squared_norms.numel()
    total = squared_norms.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("Cannot sample CUR indices from a weight that is all zero or not finite.")
    share = squared_norms / total
    usable = share >= NEGLIGIBLE_SHARE  # dead columns/rows are never drawn (see the module docstring)
    if mode == "uniform":
        weights = torch.full_like(share, 1.0 / n)
    elif mode == "standard":
        weights = share
    else:
        weights = 1.0 / share.clamp_min(NEGLIGIBLE_SHARE)
    if mode == "inverse":
        weights = weights / weights.sum()
    if usable.all():  # the paper's formula, bit for bit
        return weights
    weights = torch.where(usable, weights, torch.zeros_like(weights))
    return weights / weights.sum()


def _squared(weight: torch.Tensor) -> torch.Tensor:
    if weight.ndim != 2:
        raise ValueError(f"CUR sampling needs a 2-D weight, got shape {tuple(weight.shape)}.")
    # float32 whatever the weight's dtype, squared in place: one out × in temporary, not two.
    return weight.detach().to(torch.float32, copy=True).square_()


def selection_probabilities(weight: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """Probabilities over the columns (``dim=1``) or rows (``dim=0``) of an out × in weight."""
    # A column's squared norm sums over the rows, and a row's over the columns.
    return probabilities_from_norms(_squared(weight).sum(dim=1 - dim), mode)


def module_generator(seed: int, module_name: str, device: torch.device | str) -> torch.Generator:
    """A generator whose state depends only on the seed and the module's name."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def sample_indices(
    weight: torch.Tensor,
    r: int,
    mode: str = "inverse",
    replacement: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw r column indices (for C, out × r) and r row indices (for R, r × in) of an out × in W."""
    out_features, in_features = weight.shape
    if r > min(out_features, in_features):
        raise ValueError(
            f"Rank r={r} is larger than the weight's smaller side "
            f"({out_features} × {in_features}); choose r ≤ {min(out_features, in_features)}."
        )
    squared = _squared(weight)  # once for both: it is most of the sampling cost on large layers
    col_p = probabilities_from_norms(squared.sum(dim=0), mode)
    row_p = probabilities_from_norms(squared.sum(dim=1), mode)
    if not replacement:
        for what, p in (("columns", col_p), ("rows", row_p)):
            usable = int((p > 0).sum())
            if usable < r:
                raise ValueError(
                    f"Only {usable} of the weight's {p.numel()} {what} carry any weight (the rest are zero or below "
                    f"{NEGLIGIBLE_SHARE:g} of its squared norm), fewer than r={r} distinct ones; lower r, or sample "
                    f"with replacement."
                )
    cols = torch.multinomial(col_p, r, replacement=replacement, generator=generator)
    rows = torch.multinomial(row_p, r, replacement=replacement, generator=generator)
    return cols, rows
