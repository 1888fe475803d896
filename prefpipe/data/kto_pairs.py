"""KTO examples and their pinned mismatched partners (KTO: Ethayarajh et al. 2024).

KTO's reference point needs, for every example, the reference log-prob of *another* example's completion under
this example's prompt. Phase one fixes that partner per example and caches its log-prob, so phase two may shuffle
freely and never needs a particular batch composition.

The rule, applied within each block of input rows (one cache part), so that sharding cannot change it:

- Examples are grouped by their prompt ids, groups in order of first appearance in the block.
- With two or more groups, the t-th example of group g takes the (t mod size)-th example of group g+1
  (the last group wraps to the first). A partner therefore always has a different prompt.
- With one group of two or more examples (every example shares one prompt), the t-th example takes the
  (t+1)-th, cyclically: a different completion under the same prompt.
- A block with a single example borrows its partner from the previous block: the first example there whose prompt
  differs, else its first example. The very first block cannot borrow, and then precompute stops with an error
  asking for a larger `--part_rows`.
- No rule ever maps an example to itself. The partner's completion is cut from the right to this example's
  response budget (`max_length - len(prompt_ids)`); such cuts are counted as `kl_truncated`.

Paired data under `--kto` becomes two examples per pair, `"{row_id}:chosen"` (desirable) then
`"{row_id}:rejected"` (undesirable).
"""

from __future__ import annotations

RULE = ("group examples by prompt ids in block order; the t-th example of group g takes the (t mod size)-th of "
        "group g+1 (cyclic); one group: the next example, cyclically; a single-example block borrows from the "
        "previous block")


def examples_from(cols: dict[str, list], paired: bool) -> dict[str, list]:
    """Tokenized columns (paired or unpaired) as KTO example columns: row_id, prompt_ids, completion_ids, label."""
    if not paired:
        return {k: list(cols[k]) for k in ("row_id", "prompt_ids", "completion_ids", "label")}
    out: dict[str, list] = {"row_id": [], "prompt_ids": [], "completion_ids": [], "label": []}
    for rid, p, c, r in zip(cols["row_id"], cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"]):
        for suffix, ids, label in ((":chosen", c, True), (":rejected", r, False)):
            out["row_id"].append(rid + suffix)
            out["prompt_ids"].append(p)
            out["completion_ids"].append(ids)
            out["label"].append(label)
    return out


def assign_partners(prompts: list[list[int]]) -> list[int]:
    """Partner index for each example of a block with at least two examples (see the module docstring)."""
    n = len(prompts)
    if n < 2:
        raise ValueError("a block needs at least two examples to pair within itself")
    groups: dict[tuple, list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(j)
    members = list(groups.values())
    partner = [0] * n
    if len(members) == 1:
        for j in range(n):
            partner[j] = (j + 1) % n
        return partner
    for g, group in enumerate(members):
        nxt = members[(g + 1) % len(members)]
        for t, j in enumerate(group):
            partner[j] = nxt[t % len(nxt)]
    return partner


def borrow_partner(prompt: list[int], previous_prompts: list[list[int]]) -> int:
    """Index into the previous block's examples for a single-example block."""
    for j, p in enumerate(previous_prompts):
        if p != prompt:
            return j
    return 0


def with_partners(ex: dict[str, list], max_length: int, previous: dict[str, list] | None) -> tuple[dict, dict]:
    """Add kl_row_id and kl_completion_ids; `previous` is the previous block's examples (only used to borrow).

    Returns the columns and counts {"kl_truncated", "kl_borrowed"}.
    """
    n = len(ex["row_id"])
    counts = {"kl_truncated": 0, "kl_borrowed": 0}
    ex["kl_row_id"], ex["kl_completion_ids"] = [], []
    if n == 0:
        return ex, counts
    if n >= 2:
        source = ex
        partners = assign_partners(ex["prompt_ids"])
    else:
        if not previous or not previous["row_id"]:
            raise ValueError("single example without a previous block")
        source = previous
        partners = [borrow_partner(ex["prompt_ids"][0], previous["prompt_ids"])]
        counts["kl_borrowed"] = 1
    for j, k in enumerate(partners):
        budget = max_length - len(ex["prompt_ids"][j])
        comp = source["completion_ids"][k]
        if len(comp) > budget:
            comp = comp[:budget]
            counts["kl_truncated"] += 1
        ex["kl_row_id"].append(source["row_id"][k])
        ex["kl_completion_ids"].append(comp)
    return ex, counts


# ---------------------------------------------------------------- balance of the two kinds

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
