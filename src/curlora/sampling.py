"""CUR sampling: which columns of W become C and which rows become R.

Pure tensor code. Probabilities are always computed in float32 (squaring fp16 weights
overflowed in the reference code) on the weight's own device, and every draw comes from a
``torch.Generator`` seeded by (config seed, module name), so the same model and config give
the same C and R on every run and machine.

Duplicates: with replacement (the paper's default) an index can be drawn twice; the duplicate
column of C / row of R is kept as is, so C·U·R simply has rank below r for that layer and U
still has r² entries. ``replacement=False`` draws r distinct indices.
"""

from __future__ import annotations

import hashlib

import torch

from curlora.config import SAMPLING_MODES

# Share given to an all-zero column or row before inversion, so the inverse stays finite.
_MIN_SHARE = 1e-12


def probabilities_from_norms(squared_norms: torch.Tensor, mode: str) -> torch.Tensor:
    """Selection probabilities from the squared norms of the columns (or rows) of a weight.

    ``inverse`` (the paper): p ∝ 1 / (squared norm share), favouring low-norm columns/rows.
    ``standard`` (classic CUR): p ∝ squared norm. ``uniform``: all equal.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"Unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}.")
    n = squared_norms.numel()
    if mode == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float32, device=squared_norms.device)
    total = squared_norms.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("Cannot sample CUR indices from a weight that is all zero or not finite.")
    share = squared_norms / total
    if mode == "standard":
        return share
    inverse = 1.0 / share.clamp_min(_MIN_SHARE)
    return inverse / inverse.sum()


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
    cols = torch.multinomial(col_p, r, replacement=replacement, generator=generator)
    rows = torch.multinomial(row_p, r, replacement=replacement, generator=generator)
    return cols, rows
