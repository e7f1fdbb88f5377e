# DELLA-Merging (Deep et al. 2024): MagPrune drops each entry with a probability that falls with its
# magnitude rank, from 1 - (density - epsilon) for the smallest to 1 - (density + epsilon) for the
# largest; then, as mergekit does, the kept entries are scaled to match the dense L1 norm.

# mergekit's `della_magprune` sparsification.
def sparsify_magprune(x, density, epsilon=0.15, rescale=true, seed=0) =
    rescale_l1(magprune(x, density, epsilon, seed=seed), x, rescale)

def della(base, models, weights, density=1.0, epsilon=0.15, lambda=1.0, normalize=true, rescale=true,
          consensus_method="sum", int8_mask=false, seed=0) =
    base + lambda * disjoint_merge(sparsify_magprune(models - base, density, epsilon, rescale, seed),
                                   weights=weights, normalize=normalize, consensus_method=consensus_method)

def della_linear(base, models, weights, density=1.0, epsilon=0.15, lambda=1.0, normalize=false,
                 rescale=true, int8_mask=false, seed=0) =
    base + lambda * weighted_sum(sparsify_magprune(models - base, density, epsilon, rescale, seed),
                                 weights=weights, normalize=normalize)
