# RAM: Reinforced Agent Merging (https://arxiv.org/abs/2601.13572). Same parameters, defaults and
# math as mergekit's `ram` and `ramplus_tl`.
# An entry of a delta counts as changed when |delta| > epsilon. Where one model changed an entry,
# its delta is taken whole; where several did, their deltas are averaged over those that did.
def ram(base, models, epsilon=1e-5) =
    base + _ram_sum(models - base, nonzero_mask(models - base, epsilon=epsilon), 1)

# RAM+ (tensor-local): as `ram`, but the entries a model changed alone are scaled by
# 1 + r * clamp(shared / unique, 0, alpha), where shared and unique count, over the whole tensor,
# the entries that model changed together with others and alone.
def ramplus_tl(base, models, r=0.1, alpha=0.2, epsilon=1e-5) =
    base + _ram_sum(models - base, nonzero_mask(models - base, epsilon=epsilon),
                    _ram_boost(nonzero_mask(models - base, epsilon=epsilon), r, alpha, epsilon))

# Σ_i delta_i * changed_i * (boost_i where model i alone changed the entry) / max(changers, 1)
def _ram_sum(deltas, changed, boost) =
    sum(deltas * changed * _ram_if_alone(sum(changed), boost, 1) / clamp(sum(changed), min=1))

# a where exactly one model changed the entry (the count of changers is 1), else b.
def _ram_if_alone(changers, a, b) = where(greater(0.5, abs(changers - 1)), a, b)

def _ram_boost(changed, r, alpha, epsilon) =
    1 + r * clamp(dot(changed, greater(sum(changed), 1))
                  / clamp(dot(changed, _ram_if_alone(sum(changed), 1, 0)), min=epsilon), min=0, max=alpha)
