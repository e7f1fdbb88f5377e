# Karcher mean (mergekit's `karcher`; https://arxiv.org/abs/2603.04972): the Riemannian mean of the
# models' directions on the unit hypersphere, found by at most max_iter gradient steps (stopping
# when the step is below tol), scaled by the models' mean norm. Equal weights, no base.
def karcher(models, max_iter=10, tol=1e-5) = karcher_mean(models, max_iter=max_iter, tol=tol)
