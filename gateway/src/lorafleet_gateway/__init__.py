"""LoraFleet's gateway: one door where users chat with their adapters and send feedback.

OpenAI-compatible chat routed to a server that serves the adapter's latest committed version (read
live from the adapter's trainer, not from a status), a record of what it served, and CLaaS-shaped
feedback turned into distill steps on the adapter's trainer. It speaks ``lorafleet_api.wire`` to
the trainers and imports no other LoraFleet package.
"""
