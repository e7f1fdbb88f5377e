base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
output task_arithmetic(base, [ft0, ft1], weights=[0.3, 0.7], lambda=0.5)
