"""The bus on RabbitMQ through pika's public API: connection, publish, send with confirms, consume, rpc."""

from sagmq.amqp.bus import AmqpBus

__all__ = ["AmqpBus"]
