# Model Breadcrumbs (Davari & Belilovsky 2023): each task vector drops its largest-magnitude
# outliers (a fraction gamma) and its smallest entries, keeping a band of a fraction density.

# mergekit's `magnitude_outliers` sparsification.
def sparsify_outliers(x, density, gamma=0.01, rescale=false) =
    rescale_l1(keep_band(x, band_cutoff(x, density, gamma, bound="lower"),
                            band_cutoff(x, density, gamma, bound="upper")), x, rescale)

def breadcrumbs(base, models, weights, density=1.0, gamma=0.01, lambda=1.0, normalize=false,
                rescale=false, int8_mask=false) =
    base + lambda * weighted_sum(sparsify_outliers(models - base, density, gamma, rescale),
                                 weights=weights, normalize=normalize)

def breadcrumbs_ties(base, models, weights, density=1.0, gamma=0.01, lambda=1.0, normalize=false,
                     rescale=false, consensus_method="sum", int8_mask=false) =
    base + lambda * disjoint_merge(sparsify_outliers(models - base, density, gamma, rescale),
                                   weights=weights, normalize=normalize, consensus_method=consensus_method)
