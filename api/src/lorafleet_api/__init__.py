"""LoraFleet's wire contract: what the operator, the trainer, the gateway and the test fakes share.

Torch-free and free of every other LoraFleet package (none of them is imported here):

- ``fields``: the custom resources' field contract (bounds, patterns, enums, defaults), read from
  ``contract.json``, a generated copy of the CRDs in crds/ (scripts/sync_field_contract.py).
- ``adapters`` and ``pools``: the LoraAdapter and TrainerPool specs as typed models.
- ``wire``: the body of every trainer route, request and response, and its typed error.
"""
