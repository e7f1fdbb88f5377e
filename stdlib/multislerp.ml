# Multi-SLERP (mergekit's `multislerp`; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
# barycentric interpolation of any number of models on the unit hypersphere. Each tensor (or task
# vector dᵢ = modelᵢ - base, when a base is given) is projected onto the sphere, uᵢ = dᵢ/(|dᵢ| + eps);
# the result points along the weighted mean direction m = Σ wᵢuᵢ / |Σ wᵢuᵢ| with the weighted mean
# norm Σ wᵢ|dᵢ|. (mergekit also maps the weighted tangent vector Σ wᵢ(uᵢ - (uᵢ·m)m) back through the
# exponential map at m; that vector is Σ wᵢuᵢ - |Σ wᵢuᵢ| m = 0, so the step changes nothing but
# rounding and is left out.) When the directions cancel (|Σ wᵢuᵢ| < eps) the result is the
# weighted sum Σ wᵢdᵢ.
def multislerp(models, weights, base=0, normalize_weights=true, eps=1e-8) =
    base + _multislerp(models - base, weights / ifelse(sum(weights), 1, cond=normalize_weights), eps)

def _multislerp(ds, w, eps) = _multislerp_mean(ds, w, eps, sum(w * (ds / (norm(ds) + eps))))

def _multislerp_mean(ds, w, eps, mean) =
    where(greater(eps, norm(mean)), sum(w * ds), mean / norm(mean) * sum(w * norm(ds)))
