"""LoraFleet trainer: one base model per pod, many LoRA adapters trained by SDPO.

The engine keeps each adapter's LoRA weights and AdamW state in a CPU-resident cache between
steps; the HTTP service (``app``) exposes it to the operator and to feedback pipelines.

Layout, from the top down (the import-linter contracts in pyproject.toml keep these layers):
``cli`` and ``bench`` (commands), ``app`` (wires the routes, the service and the engine into one
FastAPI app), ``http`` (routes, auth, body limit), ``service`` (queue, wire answers, metrics,
publisher), ``engine`` (slots, cache, storage, steps on the device), ``results`` (what engine calls
return, which the service passes on), ``models`` (base models), ``learning`` (specs, samples,
prompts, the SDPO loss), then the basics every layer may use: ``settings``, ``ids``,
``validating``, ``threads`` and ``errors``.
"""
