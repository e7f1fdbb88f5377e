# Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models";
# mergekit's `model_stock`): with the mean cosine c between the fine-tunes' task vectors (over all
# pairs), t = n·c / (1 + (n-1)·c) and the result is t·avg(models) + (1-t)·base. filter_wise=true
# takes c per row (per output filter) instead of per tensor. Where 1 + (n-1)·c is about 0 the base
# is kept (t = 0).
def model_stock(base, models, filter_wise=false) =
    _model_stock(base, avg(models), count(models),
                 ifelse(cosine(models - base, eps=1e-6, guard="product", over="row"),
                        cosine(models - base, eps=1e-6, guard="product"),
                        cond=filter_wise))

def _model_stock(w0, average, n, c) = _model_stock_mix(w0, average, _model_stock_t(n, c, 1 + (n - 1) * c))

def _model_stock_t(n, c, denominator) =
    where(greater(1e-6, abs(denominator)), 0, (n * c) / where(greater(1e-6, abs(denominator)), 1, denominator))

def _model_stock_mix(w0, average, t) = t * average + (1 - t) * w0
