"""What every service process shares: start-up, logging, signals, memory settings."""
