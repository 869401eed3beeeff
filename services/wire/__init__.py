"""The wire layer shared by every sagmq service: topology, codec, messages, settings, bus."""
