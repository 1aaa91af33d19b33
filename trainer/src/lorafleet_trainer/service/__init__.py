"""The trainer service: the step queue, the wire answers, the metrics and the vLLM publisher.

``serving.TrainerService`` runs every engine call on one worker thread behind a bounded queue and
answers in the wire types of ``lorafleet_api``. It knows the engine only through its ``Engine``
protocol, so the HTTP process's service layer never imports torch.
"""
