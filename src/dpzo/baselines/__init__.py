"""The first-order and in-context baselines: DP-SGD and DP prefix tuning (backprop, Opacus-checked), fine-tuning, in-context learning."""
