# Linear merge, "model soups" (Wortsman et al. 2022): Σ wᵢ modelᵢ, divided by Σ wᵢ when normalize.
def linear(models, weights, normalize=true) = weighted_sum(models, weights=weights, normalize=normalize)
