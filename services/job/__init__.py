"""A job folder: reading it and parsing NVFlare's configuration into specs."""
