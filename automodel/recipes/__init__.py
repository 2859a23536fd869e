"""Recipes compose the components into a run; configs pick one by name (`recipe = "llm_finetune"`)."""

from automodel.recipes import llm_dpo, llm_finetune, llm_kd, vlm_finetune

RECIPES = {"llm_finetune": llm_finetune.run, "vlm_finetune": vlm_finetune.run, "llm_kd": llm_kd.run,
           "llm_dpo": llm_dpo.run}
