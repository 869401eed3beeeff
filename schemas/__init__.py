"""The language-neutral message schemas, installed with sagmq as package data (sagmq.schemas)."""
