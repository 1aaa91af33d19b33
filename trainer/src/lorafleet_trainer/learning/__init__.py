"""What the trainer learns from and how: the SDPO loss, its prompts, samples and specs.

Pure definitions with no model loaded: the LoRA and training specs (``configs``), distill samples
(``samples``), sampling requests (``sampling``), the teacher and student prompts (``prompting``)
and the SDPO loss itself (``sdpo``).
"""
