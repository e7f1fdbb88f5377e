# TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models"): trim each task
# vector to its largest-magnitude entries, elect a sign per entry, and merge the agreeing entries.

# mergekit's `magnitude` sparsification: keep the top max(1, ⌊density·n⌋) magnitudes of the tensor
# (of equal magnitudes, the lower index first), zero the rest; with rescale, match the dense L1 norm.
def sparsify_magnitude(x, density, rescale=false) =
    rescale_l1(keep_top(x, topk_cutoff(x, density)), x, rescale)

def ties(base, models, weights, density=1.0, lambda=1.0, normalize=true, rescale=false,
         consensus_method="sum", int8_mask=false) =
    base + lambda * disjoint_merge(sparsify_magnitude(models - base, density, rescale),
                                   weights=weights, normalize=normalize, consensus_method=consensus_method)
