#!/bin/sh
# Entry point of the Debian-package RabbitMQ image (deploy/rabbitmq/Dockerfile.debian).
# Writes RABBITMQ_ERLANG_COOKIE to the cookie file (cluster nodes must share
# it), then runs the command (rabbitmq-server) in the foreground.
set -eu
if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
    cookie="$HOME/.erlang.cookie"
    [ -f "$cookie" ] && chmod 600 "$cookie"
    printf '%s' "$RABBITMQ_ERLANG_COOKIE" > "$cookie"
    chmod 400 "$cookie"
    unset RABBITMQ_ERLANG_COOKIE
fi
exec "$@"
