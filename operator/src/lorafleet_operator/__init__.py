"""LoraFleet operator: reconciles TrainerPool and LoraAdapter resources (kopf, no torch).

It creates one trainer pod per GPU, places adapters on pods, and talks to trainers over HTTP only.
"""
