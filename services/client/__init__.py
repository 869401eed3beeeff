"""The client (site) service: runs a job's executors on tasks from its own queue."""
