# SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models",
# https://arxiv.org/abs/2408.07990). Same parameters, defaults and math as mergekit's `sce`.
#   Select:    keep, in every delta, the entries where the deltas vary most across the models
#              (the top `select_topk` fraction of the nonzero per-entry variances).
#   Calculate: weight each delta by its share of the summed mean squares of all deltas.
#   Erase:     drop entries whose sign disagrees with the sign of the summed deltas, then take
#              the weighted mean of what is left.
# `int8_mask` only chose the dtype of mergekit's masks; it is accepted and has no effect.
def sce(base, models, select_topk=1.0, int8_mask=false) =
    base + _sce_fuse(_sce_select(models - base, select_topk))

# The deltas with every entry outside the top `fraction` of the variance across them set to 0.
def _sce_select(deltas, fraction) =
    deltas * top_mask(variance(deltas), nonzero_topk_cutoff(variance(deltas), density=fraction))

def _sce_fuse(deltas) =
    _sce_erase_mean(deltas, _sce_weights(mean(deltas * deltas)), _sce_agrees(deltas, sum(deltas)))

# Each mean square's share of their sum; equal weights 1/n when the sum is below 1e-6 (mergekit's).
def _sce_weights(energy) =
    where(greater(1e-6, abs(sum(energy))), 1 / count(energy), energy / sum(energy))

# 1 where x is nonzero and has the sign of s (s >= 0 counts as positive), else 0.
def _sce_agrees(x, s) = where(greater(0, s), greater(0, x), greater(x, 0))

def _sce_erase_mean(deltas, weights, agrees) =
    sum(deltas * (weights * agrees)) / clamp(sum(weights * agrees), min=1e-6)
