x = model("x")
y = model("y")
left_sub = x - y - 1
left_div = x / 2 * y
neg_first = -x * y
double_neg = - -x
sum_of_products = x + y * 2 - x / 4
grouped = (x + y) * (x - (y - 1))
deep = ((((x))))
neg_group = -(x + y)
output x - -y
