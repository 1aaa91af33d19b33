"""The engine: one base model, many LoRA adapters, each step run on the device.

``engine.TrainerEngine`` loads adapters into slots (``slots``), keeps their weights and optimizer
state in a CPU cache between steps (``cache``, ``bundles``), persists them (``storage``), moves
them on and off the device (``residency``), steps (``stepping``), decodes (``decoding``) and
previews (``previewing``). ``holds`` parks a step at a named phase for the fault tests.
"""
