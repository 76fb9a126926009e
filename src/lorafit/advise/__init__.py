"""How to configure LoRA: plan (what a config costs), suggest (the rules of thumb), probe (gradient spectra ->
rank_pattern), gauss_newton (its joint-step variant), sweep (train a grid), inspect (what an adapter moved)."""
