# The task-arithmetic family (mergekit's generalized task arithmetic): each fine-tune's task vector
# (model - base) is optionally sparsified, weighted, combined, scaled by lambda and added to the base.
# Methods: task_arithmetic (here), linear (linear.ml), ties (ties.ml), dare_ties and dare_linear
# (dare.ml), breadcrumbs and breadcrumbs_ties (breadcrumbs.ml), della and della_linear (della.ml).
# int8_mask is accepted for compatibility with mergekit configs and has no effect.

# mergekit's `rescale`: scale a sparsified tensor back to the L1 norm of the dense one it came from.
def rescale_l1(sparse, dense, enabled=true) = ifelse(sparse * l1_ratio(dense, sparse), sparse, cond=enabled)

# Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
# base + lambda * Σ wᵢ (modelᵢ - base), divided by Σ wᵢ when normalize.
def task_arithmetic(base, models, weights, lambda=1.0, normalize=false, int8_mask=false) =
    base + lambda * weighted_sum(models - base, weights=weights, normalize=normalize)
