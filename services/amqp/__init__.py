"""The bus on RabbitMQ through pika's public API: connection, publish, send with confirms, consume, rpc."""
