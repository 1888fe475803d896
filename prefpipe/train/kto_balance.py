"""KTO's desirable/undesirable balance: plain arithmetic on label counts, free of torch so that `prefpipe data
check` can report it without importing torch."""

from __future__ import annotations


def kto_balancing_weight(n_desirable: int, n_undesirable: int, undesirable_weight: float = 1.0) -> float:
    """The lambda_D that makes `lambda_D * n_D / (lambda_U * n_U)` exactly 1, rounded to 2 decimals."""
    return round(undesirable_weight * n_undesirable / n_desirable, 2)


def kto_balance_warning(labels: list[bool], desirable_weight: float, undesirable_weight: float) -> str | None:
    """A warning when `lambda_D * n_D / (lambda_U * n_U)` is outside [1, 4/3], else None.

    That is the range the KTO paper (Ethayarajh et al. 2024, section 4) recommends. Outside it the larger side
    dominates the loss: with three undesirable examples per desirable one and unit weights, KTO on prefpipe's demo
    lowered every completion's log-probability until the model wrote nothing but '#'.
    """
    n_d = sum(bool(x) for x in labels)
    n_u = len(labels) - n_d
    if n_d == 0 or n_u == 0:
        return (f"warning: kto data has {n_d} desirable and {n_u} undesirable examples; KTO needs both to have "
                "a reference point worth the name")
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    fix = kto_balancing_weight(n_d, n_u, undesirable_weight)
    return (f"warning: kto data has {n_d} desirable and {n_u} undesirable examples, so lambda_D*n_D/(lambda_U*n_U) "
            f"= {ratio:.2f}, outside the KTO paper's recommended [1, 4/3]; consider --desirable_weight {fix}")
