# The DARE merge of the README.
base       = model("llama-2-13b")
wizardlm   = model("WizardLM-13B-V1.2")
wizardmath = model("WizardMath-13B-V1.0")

output base + avg(dare(wizardlm - base, p=0.9), dare(wizardmath - base, p=0.9))
