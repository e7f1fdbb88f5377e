# Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic").
# Adds the weighted task vectors (fine-tune minus base) to the base, scaled by lambda.
# Same math and defaults as mergekit's `task_arithmetic` with normalize=false (its default).
def task_arithmetic(base, models, weights, lambda=1.0) =
    base + lambda * sum(weights * (models - base))
