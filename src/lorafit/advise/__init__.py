"""How to configure LoRA: plan (what a config adapts and costs), suggest (the rules of thumb), probe (gradient
spectra -> rank_pattern) with gauss_newton (its joint-step variant) and probe_task (a training job's own model and
data), sweep (train a grid), tune (an Optuna study) with space (its search space), trial (one trial in its own
process) and tune_report (its output files), results (the results table and Pareto plot sweep and tune share), and
adapter_summary (`lorafit inspect`: what an adapter holds and moved)."""
