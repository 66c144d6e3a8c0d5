"""The kopf operator: thin handlers (handlers.py) over pure builders (builders.py) and status logic (status.py).

It uses the API models and the launcher contract, and never imports the trainer.
"""
