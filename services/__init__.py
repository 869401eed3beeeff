"""sagmq: NVIDIA FLARE's Scatter-and-Gather workflow as services choreographed over RabbitMQ."""

__version__ = "0.1.0"
