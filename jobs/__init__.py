"""The example NVFlare job folders, installed with sagmq as package data (sagmq.examples)."""
