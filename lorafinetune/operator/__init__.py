"""The kopf operator (handlers + pure builders + status logic). Not implemented yet: it builds on the API models
(`lorafinetune.api`) and the launcher contract (`lorafinetune.contract`), and must never import the trainer."""
