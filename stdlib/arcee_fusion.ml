# Arcee Fusion (Arcee AI, https://arcee.ai). Same math as mergekit's `arcee_fusion`.
# Takes the other model's entries only where they matter most: an entry's importance is
# |other - base| times the KL divergence between the softmaxes of the two models' vectors along
# the last dim, and an entry is taken where its importance reaches median + 1.5 * (q3 - q1) of
# the tensor's importances (the upper outlier fence). The quartiles are exact order statistics;
# mergekit takes them from 1,000,000 entries drawn at random when a tensor is larger.
def arcee_fusion(base, other) =
    base + (other - base) * greater_equal(_arcee_importance(base, other),
                                          _arcee_fence(_arcee_importance(base, other)))

def _arcee_importance(base, other) = abs(other - base) * softmax_kl(other, base)

def _arcee_fence(x) = quantile(x, q=0.5) + 1.5 * (quantile(x, q=0.75) - quantile(x, q=0.25))
