"""Evaluation: perplexity and KL divergence (`eval.perplexity`), benchmark tasks scored by log-likelihood or by
generation metrics (`eval.tasks`, `eval.runner`, `eval.metrics`), robustness perturbations (`eval.perturb`),
reports (`eval.report`), a running server as the model (`eval.remote`) and the lm-evaluation-harness backend
(`eval.harness`, loaded only when lm-eval asks for it)."""
