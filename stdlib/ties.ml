# TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models"): trim each task
# vector to its largest-magnitude entries, elect a sign per entry, and merge the agreeing entries.

# mergekit's `magnitude` sparsification: keep the top max(1, ⌊density·n⌋) magnitudes of the tensor
# (of equal magnitudes, the lower index first), zero the rest; with rescale, match the dense L1 norm.
def sparsify_magnitude(x, density, rescale=false) =
    rescale_l1(keep_top(x, topk_cutoff(x, density)), x, rescale)

# The TIES paper's trim (as MergeLM computes it): the top `density` of magnitudes over the whole
# model rather than per tensor; entries equal to the threshold are kept.
def sparsify_magnitude_model(x, density) = keep_at_least(x, model_magnitude_threshold(x, density))

# global_topk=true trims each task vector by a threshold over all its tensors (the paper), instead
# of per tensor (mergekit); it takes one more pass over the inputs before anything is written.
def ties(base, models, weights, density=1.0, lambda=1.0, normalize=true, rescale=false,
         consensus_method="sum", int8_mask=false, global_topk=false) =
    base + lambda * disjoint_merge(ifelse(sparsify_magnitude_model(models - base, density),
                                          sparsify_magnitude(models - base, density, rescale),
                                          cond=global_topk),
                                   weights=weights, normalize=normalize, consensus_method=consensus_method)
