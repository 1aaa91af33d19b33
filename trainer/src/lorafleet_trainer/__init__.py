"""LoraFleet trainer: one base model per pod, many LoRA adapters trained by SDPO.

The engine keeps each adapter's LoRA weights and AdamW state in a CPU-resident cache between
steps; the HTTP service (``app``) exposes it to the operator and to feedback pipelines.
"""
