"""A generator objective as a weighted sum of named, unweighted loss terms."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def weighted_sum(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``Σ_k weights[k] · terms[k]`` over the terms, in their order.

    A method forms only the terms whose weight is non-zero, so the weights come from the
    configuration and the terms from the step; keeping them apart lets each term be
    logged unweighted.

    Parameters
    ----------
    terms
        Scalar loss terms by name (e.g. ``adversarial``, ``cycle``, ``identity``).
    weights
        Weight of each term by the same names; may name terms that were not formed.

    Returns
    -------
    Tensor
        Scalar.

    Raises
    ------
    ValueError
        If ``terms`` is empty or a term has no weight.
    """
    if not terms:
        raise ValueError("weighted_sum needs at least one loss term")
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise ValueError(f"loss terms without a weight: {', '.join(missing)}")
    # Python's sum starts at 0: 0 + w·t is exactly w·t, so a single term is unchanged.
    return sum(weights[name] * term for name, term in terms.items())  # type: ignore[return-value]
