"""Few-step generation: schedulers, pipelines, LoRA stacking, the FewStepGenerator behind generate, serve and eval;
sampling defaults."""
