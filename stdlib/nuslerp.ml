# NuSLERP (mergekit's `nuslerp`): SLERP of exactly two models at t = w1 / (w0 + w1) (0.5 when the
# weights sum to about 0), with an optional base: then the two task vectors (model - base) are
# interpolated and added to the base. nuslerp_flatten=false interpolates vector by vector: the
# rows of each tensor (vectors along its last axis), or with nuslerp_row_wise=true the vectors
# along its first axis (the columns of a weight matrix), which is what mergekit computes.
# Only exactly parallel vectors (1 - cos² <= 1e-16) are interpolated linearly.
def nuslerp(models, weights, base=0, nuslerp_flatten=true, nuslerp_row_wise=false) =
    base + _nuslerp_mix(models - base,
                        _nuslerp_t(sum([0, 1] * weights), sum(weights)),
                        ifelse(cosine(models - base, eps=1e-7, guard="clamp"),
                               ifelse(cosine(models - base, eps=1e-7, guard="clamp", over="column"),
                                      cosine(models - base, eps=1e-7, guard="clamp", over="row"),
                                      cond=nuslerp_row_wise),
                               cond=nuslerp_flatten))

# t from the second weight w1 (`sum([0, 1] * weights)`, which also requires two weights) and the total.
def _nuslerp_t(w1, total) =
    where(greater(1e-6, abs(total)), 0.5, w1 / where(greater(1e-6, abs(total)), 1, total))

# [d0, d1] interpolated by t along the arc between them, whose cosine is c.
def _nuslerp_mix(ds, t, c) =
    where(greater(1 - c * c, 1e-16),
          sum(sin([1 - t, t] * acos(c)) * ds) / sin(acos(c)),
          sum([1 - t, t] * ds))
