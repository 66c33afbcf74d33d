"""The embedded default: a small Stable-Diffusion-architecture model and everything specific to its world.

The procedural captioned shapes dataset (`shapes`), the model's components and training (`components`, `base`,
`finetune`), and the measures that only make sense on shapes: the prompt-adherence judge (`adherence`) and the FID
feature network (`features`). The method itself (`pnpguide.guide`, `teacher`, `pipeline`, the two distillation
stages) never imports from here except for the embedded default's data.
"""
