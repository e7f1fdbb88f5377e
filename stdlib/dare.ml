# DARE (Yu et al. 2023, "Language Models are Super Mario") as mergekit's dare_ties and dare_linear:
# each task vector keeps every entry with probability density, then (rescale=true, the default) is
# scaled to match its dense L1 norm. The paper's own rescaling by 1/(1 - p) is the `dare` primitive.

# mergekit's `random` sparsification.
def sparsify_random(x, density, rescale=true, seed=0) = rescale_l1(keep_random(x, density, seed=seed), x, rescale)

def dare_ties(base, models, weights, density=1.0, lambda=1.0, normalize=false, rescale=true,
              consensus_method="sum", int8_mask=false, seed=0) =
    base + lambda * disjoint_merge(sparsify_random(models - base, density, rescale, seed),
                                   weights=weights, normalize=normalize, consensus_method=consensus_method)

def dare_linear(base, models, weights, density=1.0, lambda=1.0, normalize=false, rescale=true,
                int8_mask=false, seed=0) =
    base + lambda * weighted_sum(sparsify_random(models - base, density, rescale, seed),
                                 weights=weights, normalize=normalize)
