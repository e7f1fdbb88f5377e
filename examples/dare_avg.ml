# DARE (Yu et al. 2023): sparsify each fine-tune's delta (drop 90%, rescale the rest by 10),
# average the two deltas and add them back onto the base.
#   mergelang run examples/dare_avg.ml -o merged/ --seed 7 \
#       --model base=PATH --model ft0=PATH --model ft1=PATH
base = model("models/base")
ft0  = model("models/ft0")
ft1  = model("models/ft1")

output base + avg(dare(ft0 - base, p=0.9), dare(ft1 - base, p=0.9))
