"""The trainer's HTTP edge: the routes, bearer-token auth and the request body limit.

Routes turn a request into a call on the service and its typed result into the wire answer; they
never reach the engine, and nothing here loads torch (an import-linter contract keeps it so). The
app that wires these to the service and the engine is ``lorafleet_trainer.app``.
"""
